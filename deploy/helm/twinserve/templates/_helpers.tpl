{{- define "twinserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "twinserve.fullname" -}}
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

{{- define "twinserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "twinserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "twinserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "twinserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "twinserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{- define "twinserve.claimName" -}}
{{- default (printf "%s-artifacts" (include "twinserve.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "twinserve.artifactPath" -}}
{{- printf "/artifacts/%s" .Values.artifactName }}
{{- end }}

{{/*
Seconds Kubernetes waits after SIGTERM: terminationGracePeriodSeconds when set, else the preStop sleep +
TWINSERVE_DRAIN_TIMEOUT_S (rounded up) + 10 s (the last responses' 5 s after the drain, and a margin).
*/}}
{{- define "twinserve.terminationGracePeriodSeconds" -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- $drain := .Values.config.TWINSERVE_DRAIN_TIMEOUT_S | default "30" | float64 | ceil | int -}}
{{- add (int .Values.preStopSleepSeconds) $drain 10 -}}
{{- end -}}
{{- end -}}
