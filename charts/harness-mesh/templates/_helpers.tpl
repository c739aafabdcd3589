{{/*
Names and labels shared by the templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "harness-mesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: "<release>-harness-mesh", or just the release name when it
already contains the chart name. It always starts with the release name (unless
fullnameOverride is set), so cluster-scoped objects of two releases never collide. Truncated to
40 characters so that the longest suffix below still fits the 63-character limit of labels.
*/}}
{{- define "harness-mesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "harness-mesh.controllerName" -}}
{{ include "harness-mesh.fullname" . }}-controller
{{- end }}

{{/* The ConfigMap that keeps the controller's IP hold-back across restarts. */}}
{{- define "harness-mesh.ipHoldConfigMap" -}}
{{ include "harness-mesh.controllerName" . }}-ip-holds
{{- end }}

{{- define "harness-mesh.agentName" -}}
{{ include "harness-mesh.fullname" . }}-agent
{{- end }}

{{/* Labels of every object. */}}
{{- define "harness-mesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "harness-mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: harness-mesh
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "controller"). */}}
{{- define "harness-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "harness-mesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects; call like selectorLabels. */}}
{{- define "harness-mesh.componentLabels" -}}
{{ include "harness-mesh.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference; call with (dict "image" .Values.controller.image "ctx" $). */}}
{{- define "harness-mesh.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The full username of the agents' ServiceAccount, as the API server authenticates it. */}}
{{- define "harness-mesh.agentUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "harness-mesh.agentName" . }}
{{- end }}

{{/* The user of every machine `meshctl enroll` adds, less the machine's name: its ServiceAccount
is mesh-machine-NAME in the release namespace (crates/meshctl/src/enroll/api.rs). */}}
{{- define "harness-mesh.machineUserPrefix" -}}
system:serviceaccount:{{ .Release.Namespace }}:mesh-machine-
{{- end }}
