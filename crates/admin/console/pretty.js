// Request and response bodies as a person reads them: JSON indented, XML
// indented, anything else as it came.

export function pretty(body, contentType = '') {
  if (typeof body !== 'string' || body === '') return body || '';
  const type = contentType.toLowerCase();
  const trimmed = body.trim();
  if (type.includes('json') || /^[[{]/.test(trimmed)) {
    try { return JSON.stringify(JSON.parse(body), null, 2); } catch { /* as it came */ }
  }
  if (type.includes('xml') || trimmed.startsWith('<')) {
    const xml = prettyXml(body);
    if (xml !== null) return xml;
  }
  return body;
}

function prettyXml(text) {
  const doc = new DOMParser().parseFromString(text, 'application/xml');
  if (doc.getElementsByTagName('parsererror').length > 0) return null;
  const out = [];
  const declaration = /^\s*(<\?xml[^?]*\?>)/.exec(text);
  if (declaration) out.push(declaration[1]);
  const serializer = new XMLSerializer();
  const walk = (node, depth) => {
    const pad = '  '.repeat(depth);
    if (node.nodeType === Node.TEXT_NODE) {
      const t = node.textContent.trim();
      if (t) out.push(pad + escape(t));
      return;
    }
    if (node.nodeType !== Node.ELEMENT_NODE) {
      out.push(pad + serializer.serializeToString(node));
      return;
    }
    const attrs = [...node.attributes].map((a) => ` ${a.name}="${escape(a.value, true)}"`).join('');
    const kids = [...node.childNodes].filter((c) => c.nodeType !== Node.TEXT_NODE || c.textContent.trim());
    if (kids.length === 0) {
      out.push(`${pad}<${node.nodeName}${attrs}/>`);
    } else if (kids.length === 1 && kids[0].nodeType === Node.TEXT_NODE) {
      out.push(`${pad}<${node.nodeName}${attrs}>${escape(kids[0].textContent.trim())}</${node.nodeName}>`);
    } else {
      out.push(`${pad}<${node.nodeName}${attrs}>`);
      for (const kid of kids) walk(kid, depth + 1);
      out.push(`${pad}</${node.nodeName}>`);
    }
  };
  walk(doc.documentElement, 0);
  return out.join('\n');
}

function escape(text, attribute = false) {
  const t = text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  return attribute ? t.replace(/"/g, '&quot;') : t;
}
