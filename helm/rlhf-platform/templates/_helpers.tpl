{{/*
Shared pieces of the chart: names, labels, images, the settings every service reads, security
contexts and volumes. A component is one of: policy reward reference rollout trainer gateway
curator.
*/}}

{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>, e.g. rlhf-rlhf-platform-policy. Call with (dict "root" $ "component" "policy"). */}}
{{- define "rlhf.componentName" -}}
{{- printf "%s-%s" (include "rlhf.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "rlhf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rlhf.selectorLabels" . }}
app.kubernetes.io/part-of: rlhf-platform
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "rlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rlhf.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "rlhf.tritonImage" -}}
{{- printf "%s:%s" .Values.tritonImage.repository (default .Chart.AppVersion .Values.tritonImage.tag) -}}
{{- end -}}

{{/* host:port list of the Kafka brokers: the external list, or the Strimzi bootstrap Service. */}}
{{- define "rlhf.kafkaBootstrap" -}}
{{- if .Values.kafka.bootstrapServers -}}
{{- .Values.kafka.bootstrapServers -}}
{{- else if .Values.kafka.strimzi.clusterName -}}
{{- $ns := default .Release.Namespace .Values.kafka.strimzi.namespace -}}
{{- printf "%s-kafka-bootstrap.%s.svc:%d" .Values.kafka.strimzi.clusterName $ns (int .Values.kafka.strimzi.port) -}}
{{- else -}}
{{- fail "kafka: set kafka.bootstrapServers (an external cluster) or kafka.strimzi.clusterName (a Strimzi Kafka in the cluster)" -}}
{{- end -}}
{{- end -}}

{{/* Settings every Python container reads (shared env prefixes RLHF_KAFKA_, plus offline model loading). */}}
{{- define "rlhf.commonEnv" -}}
- name: RLHF_KAFKA_BOOTSTRAP_SERVERS
  value: {{ include "rlhf.kafkaBootstrap" . | quote }}
- name: RLHF_KAFKA_CLIENT_ID
  value: {{ .Values.kafka.clientId | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: HOME
  value: /tmp
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: TOKENIZERS_PARALLELISM
  value: "false"
{{- end -}}

{{/* Where Triton runs the model (its instance kind) and in which dtype: (dict "root" $ "prefix" "RLHF_POLICY_"). */}}
{{- define "rlhf.deviceEnv" -}}
- name: {{ .prefix }}DEVICE
  value: {{ ternary "gpu" "cpu" .root.Values.gpu.enabled | quote }}
- name: {{ .prefix }}DTYPE
  value: {{ ternary .root.Values.gpu.dtype "float32" .root.Values.gpu.enabled | quote }}
{{- end -}}

{{/* extraEnv map -> env list, sorted by name. */}}
{{- define "rlhf.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Resources, plus the GPU limit when gpu.enabled: (dict "root" $ "resources" .resources "gpu" true). */}}
{{- define "rlhf.resources" -}}
{{- $res := deepCopy .resources -}}
{{- if and .gpu .root.Values.gpu.enabled -}}
{{- $limits := default dict $res.limits -}}
{{- $_ := set $limits .root.Values.gpu.resourceName (int .root.Values.gpu.perPod) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "rlhf.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "rlhf.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* The model volume (models.source=pvc), mounted read-only. */}}
{{- define "rlhf.modelVolume" -}}
{{- if eq .Values.models.source "pvc" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.models.pvc.claimName }}
    readOnly: true
{{- end -}}
{{- end -}}

{{- define "rlhf.modelVolumeMount" -}}
{{- if eq .Values.models.source "pvc" -}}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* Pod-level fields every pod shares: (dict "root" $ "cfg" <component values> "gpu" bool). */}}
{{- define "rlhf.podCommon" -}}
serviceAccountName: {{ include "rlhf.serviceAccountName" .root }}
automountServiceAccountToken: {{ .root.Values.serviceAccount.automountToken }}
securityContext:
  {{- include "rlhf.podSecurityContext" .root | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $nodeSelector := .cfg.nodeSelector | default dict }}
{{- $tolerations := .cfg.tolerations | default list }}
{{- if and .gpu .root.Values.gpu.enabled }}
{{- $nodeSelector = merge (deepCopy $nodeSelector) .root.Values.gpu.nodeSelector }}
{{- $tolerations = concat $tolerations .root.Values.gpu.tolerations }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .cfg.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget for one component: (dict "root" $ "component" "policy" "cfg" .Values.policy). */}}
{{- define "rlhf.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "rlhf.componentName" . }}
  labels:
    {{- include "rlhf.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .cfg.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "rlhf.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* Probe on a worker's Prometheus endpoint (prometheus-client's server): the process is up and serving. */}}
{{- define "rlhf.metricsProbes" -}}
startupProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /metrics, port: metrics}
  periodSeconds: 10
  timeoutSeconds: 5
{{- end -}}

{{/*
The env prefix of a model service's settings: every one reads the same names under it
(services/common/settings.py, ModelServiceSettings), e.g. RLHF_REWARD_GRPC_PORT. Call with the
component name.
*/}}
{{- define "rlhf.modelServiceEnvPrefix" -}}
{{- printf "RLHF_%s_" (upper .) -}}
{{- end -}}

{{/*
A PersistentVolumeClaim kept on uninstall. Call with (dict "ctx" $ctx "suffix" "state"
"accessMode" "ReadWriteOnce" "storage" $cfg.persistence), where storage has size and, optionally,
storageClassName.
*/}}
{{- define "rlhf.pvc" -}}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ include "rlhf.componentName" .ctx }}-{{ .suffix }}
  labels:
    {{- include "rlhf.labels" .ctx | nindent 4 }}
  annotations:
    helm.sh/resource-policy: keep
spec:
  accessModes: [{{ .accessMode }}]
  {{- with .storage.storageClassName }}
  storageClassName: {{ . }}
  {{- end }}
  resources:
    requests:
      storage: {{ .storage.size }}
{{- end -}}
