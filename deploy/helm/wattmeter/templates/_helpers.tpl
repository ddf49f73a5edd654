{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "wattmeter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. If the release name contains the chart name it is
used as is.
*/}}
{{- define "wattmeter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "wattmeter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wattmeter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wattmeter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end }}

{{- define "wattmeter.labels" -}}
helm.sh/chart: {{ include "wattmeter.chart" . }}
{{ include "wattmeter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "wattmeter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wattmeter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wattmeter.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
"true" when the server speaks TLS: a TLS Secret is mounted or the inline web
config has a tls_server_config section. (An existingSecret web config is
opaque to the chart: set webConfig.tlsSecret alongside it.)
*/}}
{{- define "wattmeter.tls" -}}
{{- if and .Values.webConfig.enabled (or .Values.webConfig.tlsSecret (hasKey .Values.webConfig.config "tls_server_config")) -}}
true
{{- end }}
{{- end }}

{{- define "wattmeter.scheme" -}}
{{- if include "wattmeter.tls" . }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/*
"true" when basic auth may be on: /healthz then answers 401 to the kubelet,
so the probes use TCP instead. An existingSecret web config is opaque to the
chart and treated as having basic auth.
*/}}
{{- define "wattmeter.basicAuth" -}}
{{- if and .Values.webConfig.enabled (or .Values.webConfig.existingSecret (hasKey .Values.webConfig.config "basic_auth_users")) -}}
true
{{- end }}
{{- end }}

{{- define "wattmeter.probeAction" -}}
{{- if include "wattmeter.basicAuth" . -}}
tcpSocket:
  port: metrics
{{- else -}}
httpGet:
  path: /healthz
  port: metrics
  scheme: {{ include "wattmeter.scheme" . }}
{{- end }}
{{- end }}
