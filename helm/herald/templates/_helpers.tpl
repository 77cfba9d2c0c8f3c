{{/*
The five services. For each: the values key holding its settings, the variable
naming the address of its health server (/live, /ready, /metrics; the admin's
API has an address of its own, HERALD_ADMIN_ADDR), and which secrets it reads.
*/}}
{{- define "herald.components" -}}
ingest:
  key: ingest
  addrEnv: HERALD_INGEST_HEALTH_ADDR
  redis: false
  secretKey: false
matcher:
  key: matcher
  addrEnv: HERALD_MATCHER_HEALTH_ADDR
  redis: true
  secretKey: false
deliverer:
  key: deliverer
  addrEnv: HERALD_DELIVERER_HEALTH_ADDR
  redis: true
  secretKey: true
log-writer:
  key: logWriter
  addrEnv: HERALD_LOG_WRITER_HEALTH_ADDR
  redis: true
  secretKey: false
admin:
  key: admin
  addrEnv: HERALD_ADMIN_HEALTH_ADDR
  redis: true
  secretKey: true
{{- end }}

{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects; a service's objects are "<fullname>-<service>",
so this stays short enough for "-log-writer" to fit in 63 characters.
*/}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- end }}

{{/* Selector labels of one service; call with (dict "ctx" $ "component" "ingest"). */}}
{{- define "herald.componentSelectorLabels" -}}
{{ include "herald.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "herald.componentLabels" -}}
{{ include "herald.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "herald.componentName" -}}
{{- printf "%s-%s" (include "herald.fullname" .ctx) .component }}
{{- end }}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "herald.configMapName" -}}
{{- include "herald.fullname" . }}
{{- end }}

{{/* The Secret the services read: the operator's own, or the one the chart makes. */}}
{{- define "herald.secretName" -}}
{{- default (include "herald.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "herald.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* host:port for a service's HTTP server. */}}
{{- define "herald.listenAddr" -}}
{{- printf "%s:%d" .ctx.Values.listenHost (int .port) }}
{{- end }}

{{/*
Refuses NATS settings the services would refuse at start, or that would
silently connect without what the operator asked for.
*/}}
{{- define "herald.validateNats" -}}
{{- $auth := .Values.nats.auth }}
{{- $tls := .Values.nats.tls }}
{{- $methods := list }}
{{- range $key := list "tokenKey" "nkeyKey" "credsKey" }}
{{- if index $auth $key }}
{{- $methods = append $methods $key }}
{{- end }}
{{- end }}
{{- if gt (len $methods) 1 }}
{{- fail (printf "nats.auth: set one of tokenKey, nkeyKey and credsKey, not %s (the services refuse two ways to authenticate)" (join " and " $methods)) }}
{{- end }}
{{- if and $methods (not .Values.secrets.existingSecret) (contains "@" .Values.secrets.natsUrl) }}
{{- fail (printf "nats.auth.%s is set and secrets.natsUrl carries credentials (user@ or user:password@): give NATS one way to authenticate" (first $methods)) }}
{{- end }}
{{- if and $methods (not $auth.existingSecret) }}
{{- fail (printf "nats.auth.%s is set but nats.auth.existingSecret is empty: name the Secret that holds it" (first $methods)) }}
{{- end }}
{{- if and $auth.existingSecret (not $methods) }}
{{- fail "nats.auth.existingSecret is set but names no key: set tokenKey, nkeyKey or credsKey" }}
{{- end }}
{{- if and $tls.certKey (not $tls.keyKey) }}
{{- fail "nats.tls.certKey is set without nats.tls.keyKey: a client certificate needs its key" }}
{{- end }}
{{- if and $tls.keyKey (not $tls.certKey) }}
{{- fail "nats.tls.keyKey is set without nats.tls.certKey: a client key needs its certificate" }}
{{- end }}
{{- if and $tls.certKey (not $tls.existingSecret) }}
{{- fail "nats.tls.certKey and keyKey are set but nats.tls.existingSecret is empty: name the Secret that holds them" }}
{{- end }}
{{- if and $tls.existingSecret (not $tls.caKey) (not $tls.certKey) }}
{{- fail "nats.tls.existingSecret is set but names no key: set caKey, or certKey and keyKey" }}
{{- end }}
{{- end }}
