{{/* Names and labels. */}}
{{- define "hotswap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hotswap.fullname" -}}
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

{{- define "hotswap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hotswap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hotswap.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "hotswap.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hotswap
{{- end }}

{{- define "hotswap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hotswap.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The leader-election Lease, in the release namespace. */}}
{{- define "hotswap.leaseName" -}}
{{- include "hotswap.fullname" . }}
{{- end }}

{{/*
The operator's permissions in each namespace it manages: exactly the calls it makes
(operator/hotswap_operator/kube.py) plus what kopf needs to watch and to hold its finalizer.
- inferencepools: get (controller), list/watch (kopf), patch (kopf adds and removes the finalizer
  that stops a pool's daemon before the pool goes away);
- weightversions: get/list/watch (kopf, controller), delete (finished versions beyond a pool's
  spec.versionHistoryLimit);
- inferencepools/status, weightversions/status: patch (phases, conditions, counts);
- inferencepools/finalizers: update - creating the Deployment and Secret with an ownerReference
  that has blockOwnerDeletion needs it where the OwnerReferencesPermissionEnforcement admission
  plugin is on (OpenShift);
- deployments: get/create/update (the pool's workload; update is a PUT of the desired object);
- pods: list/watch (kopf wakes the pool's loop), patch (the weight-version label);
- pods/status: patch (the hotswap.dev/weights-ready readiness-gate condition);
- secrets: get/create (the per-pool agent token; names are per pool, so no resourceNames);
- events: create (the controller's and kopf's events).
*/}}
{{- define "hotswap.namespacedRules" -}}
- apiGroups: ["hotswap.dev"]
  resources: ["inferencepools"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["hotswap.dev"]
  resources: ["weightversions"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["hotswap.dev"]
  resources: ["inferencepools/status", "weightversions/status"]
  verbs: ["patch"]
- apiGroups: ["hotswap.dev"]
  resources: ["inferencepools/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "create", "update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "patch"]
- apiGroups: [""]
  resources: ["pods/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{- define "hotswap.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
