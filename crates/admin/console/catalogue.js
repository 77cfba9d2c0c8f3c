// The event catalogue as the seed products show it — executions, steps,
// definitions, workers, Herald's own — and the filters that fit the chosen
// types: workflow for every workflow event, status for ended executions and
// steps, step for step events, worker for worker events.

const ENDED = new Set([
  'workflow.completed', 'workflow.failed', 'workflow.timed_out', 'workflow.canceled',
  'workflow.step.completed', 'workflow.step.failed',
]);

export const GROUPS = [
  { title: 'Executions', test: (t) => /^workflow\.[a-z_]+$/.test(t.name) && !t.system },
  { title: 'Steps (tasks, activities, actions)', test: (t) => t.name.startsWith('workflow.step.') },
  { title: 'Workflow definitions (state machines, flows, rules)', test: (t) => t.name.startsWith('workflow.definition.') },
  { title: 'Workers', test: (t) => t.name.startsWith('worker.') },
  { title: "Herald's own events", test: (t) => t.system },
  { title: 'Other events', test: () => true },
];

// The catalogue in groups, in catalogue order within each: [{title, types}].
export function grouped(types) {
  const groups = GROUPS.map((g) => ({ title: g.title, types: [] }));
  for (const t of types) {
    const i = GROUPS.findIndex((g) => g.test(t));
    groups[i].types.push(t);
  }
  return groups.filter((g) => g.types.length > 0);
}

export const FILTERS = [
  {
    key: 'workflow',
    label: 'Workflows',
    hint: 'Names of state machines, flows or rules, comma-separated; * matches any characters.',
    applies: (type) => type.startsWith('workflow.'),
  },
  {
    key: 'status',
    label: 'Status',
    hint: 'How the execution or step ended.',
    values: ['succeeded', 'failed', 'timed_out', 'canceled'],
    applies: (type) => ENDED.has(type),
  },
  {
    key: 'step',
    label: 'Steps',
    hint: 'Names of tasks, activities or actions, comma-separated; * matches any characters.',
    applies: (type) => type.startsWith('workflow.step.'),
  },
  {
    key: 'worker',
    label: 'Workers',
    hint: 'Worker names, comma-separated; * matches any characters.',
    applies: (type) => type.startsWith('worker.'),
  },
];

// Whether a type pattern selects a type: `*` one token, `>` the rest.
export function selects(pattern, type) {
  const p = pattern.split('.');
  const t = type.split('.');
  for (let i = 0; i < p.length; i += 1) {
    if (p[i] === '>') return t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== '*' && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

// The catalogue's types that a webhook's event_types select.
export function selected(eventTypes, catalogue) {
  return catalogue.map((t) => t.name).filter((name) => eventTypes.some((p) => selects(p, name)));
}

// Splits "a, b ,c" into ["a", "b", "c"].
export function list(text) {
  return text.split(',').map((s) => s.trim()).filter(Boolean);
}
