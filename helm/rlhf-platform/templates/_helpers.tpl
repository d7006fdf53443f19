{{/*
Shared pieces of the chart: names, labels, images, the settings every service reads, security
contexts and volumes. A component is one of: policy reward reference judge rollout trainer
gateway curator refresh topics kafka.
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

{{/* host:port list of the Kafka brokers: the chart's own broker (kafka.local), the external list, or the Strimzi bootstrap Service. */}}
{{- define "rlhf.kafkaBootstrap" -}}
{{- if .Values.kafka.local.enabled -}}
{{- printf "%s.%s.svc:%d" (include "rlhf.componentName" (dict "root" . "component" "kafka")) .Release.Namespace (int .Values.kafka.local.port) -}}
{{- else if .Values.kafka.bootstrapServers -}}
{{- .Values.kafka.bootstrapServers -}}
{{- else if .Values.kafka.strimzi.clusterName -}}
{{- $ns := default .Release.Namespace .Values.kafka.strimzi.namespace -}}
{{- printf "%s-kafka-bootstrap.%s.svc:%d" .Values.kafka.strimzi.clusterName $ns (int .Values.kafka.strimzi.port) -}}
{{- else -}}
{{- fail "kafka: set kafka.bootstrapServers (an external cluster) or kafka.strimzi.clusterName (a Strimzi Kafka in the cluster)" -}}
{{- end -}}
{{- end -}}

{{/*
Settings every Python container reads (shared env prefixes RLHF_KAFKA_, plus offline model loading).
With kafka.securityProtocol other than PLAINTEXT, every Kafka client connects with it; a SASL_*
protocol takes its login from the Secret kafka.sasl.existingSecret (keys username and password,
by secretKeyRef: the chart renders no credential).
*/}}
{{- define "rlhf.commonEnv" -}}
{{- $kafka := .Values.kafka -}}
- name: RLHF_KAFKA_BOOTSTRAP_SERVERS
  value: {{ include "rlhf.kafkaBootstrap" . | quote }}
- name: RLHF_KAFKA_CLIENT_ID
  value: {{ $kafka.clientId | quote }}
{{- if ne $kafka.securityProtocol "PLAINTEXT" }}
{{- if $kafka.local.enabled }}
{{- fail (printf "kafka.securityProtocol=%s: the chart's own broker (kafka.local) listens for PLAINTEXT only" $kafka.securityProtocol) }}
{{- end }}
- name: RLHF_KAFKA_SECURITY_PROTOCOL
  value: {{ $kafka.securityProtocol | quote }}
{{- end }}
{{- if $kafka.tls.existingSecret }}
{{- if not (has $kafka.securityProtocol (list "SSL" "SASL_SSL")) }}
{{- fail (printf "kafka.tls.existingSecret is set but kafka.securityProtocol=%s uses no TLS: choose SSL or SASL_SSL" $kafka.securityProtocol) }}
{{- end }}
- name: RLHF_KAFKA_SSL_CA_FILE
  value: {{ include "rlhf.kafkaTlsDir" . }}/ca.crt
{{- if $kafka.tls.clientCertificate }}
- name: RLHF_KAFKA_SSL_CERT_FILE
  value: {{ include "rlhf.kafkaTlsDir" . }}/tls.crt
- name: RLHF_KAFKA_SSL_KEY_FILE
  value: {{ include "rlhf.kafkaTlsDir" . }}/tls.key
{{- end }}
{{- else if eq $kafka.securityProtocol "SSL" }}
{{- fail "kafka.tls.existingSecret is required with kafka.securityProtocol=SSL: a Secret with ca.crt (and tls.crt, tls.key for mutual TLS), e.g. kubectl create secret generic rlhf-kafka-tls --from-file=ca.crt --from-file=tls.crt --from-file=tls.key" }}
{{- end }}
{{- if hasPrefix "SASL_" $kafka.securityProtocol }}
{{- if not $kafka.sasl.existingSecret }}
{{- fail (printf "kafka.sasl.existingSecret is required with kafka.securityProtocol=%s: a Secret with keys username and password (kubectl create secret generic rlhf-kafka-login --from-literal=username=... --from-literal=password=...)" $kafka.securityProtocol) }}
{{- end }}
- name: RLHF_KAFKA_SASL_MECHANISM
  value: {{ $kafka.sasl.mechanism | quote }}
- name: RLHF_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.sasl.existingSecret }}
      key: username
- name: RLHF_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.sasl.existingSecret }}
      key: password
{{- end }}
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

{{/*
Pod-level fields every pod shares: (dict "root" $ "cfg" <component values> "gpu" bool "hook" bool).
A hook's pod (the topics Job) may run before the chart's ServiceAccount exists, so it runs as the
namespace's `default` account unless serviceAccount names one made outside the chart.
*/}}
{{- define "rlhf.podCommon" -}}
{{- if not (and .hook .root.Values.serviceAccount.create) -}}
serviceAccountName: {{ include "rlhf.serviceAccountName" .root }}
{{ end -}}
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
Whether a model service has a headless Service beside its ClusterIP one (templates/model-services.yaml):
asked for (headlessService), or the reward while the refresh reloads every replica. "true" or
empty. Call with (dict "root" $ "component" "reward").
*/}}
{{- define "rlhf.hasHeadlessService" -}}
{{- $cfg := index .root.Values .component -}}
{{- if or $cfg.headlessService (and (eq .component "reward") .root.Values.refresh.enabled) -}}true{{- end -}}
{{- end -}}

{{/*
The gRPC address (host:port) a client of a model service calls: its headless Service where it
has one, so that the client's channel (services/common/channels.py: one dns:/// name, resolved
again whenever a connection breaks) balances over every ready replica; its ClusterIP Service
otherwise. Call with (dict "root" $ "component" "policy").
*/}}
{{- define "rlhf.modelServiceAddress" -}}
{{- $name := include "rlhf.componentName" . -}}
{{- $port := (index .root.Values .component).grpcPort -}}
{{- if include "rlhf.hasHeadlessService" . -}}
{{- printf "%s-headless.%s.svc.cluster.local:%v" $name .root.Release.Namespace $port -}}
{{- else -}}
{{- printf "%s:%v" $name $port -}}
{{- end -}}
{{- end -}}

{{/*
The PolicyService the judge asks for its verdicts (RLHF_JUDGE_POLICY_ADDRESS), empty when the
judge runs its own model in its Triton sidecar (model mode): judge.policyAddress as given, or
with judge.throughPolicy this release's policy (rlhf.modelServiceAddress). Only the judge has it;
call with (dict "root" $ "component" "judge"). Setting both, or throughPolicy without the
policy, is refused rather than guessed at.
*/}}
{{- define "rlhf.judgePolicyAddress" -}}
{{- if eq .component "judge" -}}
{{- $judge := .root.Values.judge -}}
{{- if and $judge.throughPolicy $judge.policyAddress -}}
{{- fail "judge: set judge.throughPolicy (this release's policy) or judge.policyAddress (another PolicyService), not both" -}}
{{- else if $judge.throughPolicy -}}
{{- if not .root.Values.policy.enabled -}}
{{- fail "judge.throughPolicy needs policy.enabled=true (or name another PolicyService in judge.policyAddress)" -}}
{{- end -}}
{{- include "rlhf.modelServiceAddress" (dict "root" .root "component" "policy") -}}
{{- else -}}
{{- $judge.policyAddress -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The control token (services/common/control_auth.py): the policy accepts UpdateWeights and the
reward ReloadModel only from callers sending it; the trainer and the refresh send it. Only those
four pods get it, and only in the container that uses it. It comes from the Secret the operator
named (controlPlane.existingSecret; the chart ships no default token, so rendering any of those
pods without it fails), mounted read-only as a file: RLHF_CONTROL_TOKEN_FILE names the file, so
the token shows in no environment dump and no `kubectl describe`, and a rotated Secret reaches
the file in place (the callers read it on every call, the services when they start). The container's env gets rlhf.controlTokenEnv, its volumeMounts
rlhf.controlTokenVolumeMount, and its pod's volumes rlhf.controlTokenVolume; each takes the root.
*/}}
{{- define "rlhf.controlTokenDir" -}}/run/secrets/rlhf-control{{- end -}}

{{- define "rlhf.controlSecret" -}}
{{- if not .Values.controlPlane.existingSecret -}}
{{- fail "controlPlane.existingSecret is required: create a Secret holding the control-plane token (kubectl create secret generic rlhf-control --from-literal=token=\"$(openssl rand -base64 32)\") and set controlPlane.existingSecret to its name; the policy and reward accept weight pushes and reloads only from callers holding it, and the chart ships no default token" -}}
{{- end -}}
{{- .Values.controlPlane.existingSecret -}}
{{- end -}}

{{- define "rlhf.controlTokenEnv" -}}
- name: RLHF_CONTROL_TOKEN_FILE
  value: {{ include "rlhf.controlTokenDir" . }}/token
{{- with .Values.controlPlane.allowedIdentities }}
- name: RLHF_CONTROL_ALLOWED_IDENTITIES
  value: {{ join "," . | quote }}
{{- end }}
{{- end -}}

{{- define "rlhf.controlTokenVolumeMount" -}}
- {name: control-token, mountPath: {{ include "rlhf.controlTokenDir" . }}, readOnly: true}
{{- end -}}

{{- define "rlhf.controlTokenVolume" -}}
- name: control-token
  secret:
    secretName: {{ include "rlhf.controlSecret" . }}
    # Only the one key, as the file `token`.
    items:
      - {key: {{ .Values.controlPlane.key | quote }}, path: token}
    # 0440: the owner and the pod's fsGroup (uid/gid 1000 run every container) read it.
    defaultMode: 288
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

{{/*
A HorizontalPodAutoscaler (autoscaling/v2) on load, for a model service with an `autoscaling`
block (the policy): (dict "root" $ "component" "policy" "cfg" .Values.policy).
  1. Pods metric `queueDepthMetric` (rlhf_policy_queue_depth: sequences admitted to Triton and
     not finished, per pod), averaged over the pods, through the custom metrics API; the adapter
     (prometheus-adapter) must expose the policy's gauge under that name for the pods.
  2. CPU utilisation, the fallback: the HPA takes the larger of the two proposals, and while the
     custom metrics API has no value it still scales up on CPU (it never scales down on a
     partial set of metrics).
New replicas load their model first and catch up with the trainer from rlhf.weights.v1, so
scale-down waits scaleDownStabilizationSeconds.
*/}}
{{- define "rlhf.loadHPA" -}}
{{- $name := include "rlhf.componentName" . -}}
{{- $scale := .cfg.autoscaling -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "rlhf.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $scale.minReplicas }}
  maxReplicas: {{ $scale.maxReplicas }}
  metrics:
    - type: Pods
      pods:
        metric:
          name: {{ $scale.queueDepthMetric }}
        target:
          type: AverageValue
          averageValue: {{ $scale.targetQueueDepth | toString | quote }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $scale.targetCPUUtilizationPercentage }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: {{ $scale.scaleDownStabilizationSeconds }}
{{- end -}}

{{/*
The Kafka clients' certificates (kafka.tls.existingSecret), for every container that has
rlhf.commonEnv: a read-only folder with ca.crt and, for mutual TLS, tls.crt and tls.key. Both
helpers render nothing when no Secret is named.
*/}}
{{- define "rlhf.kafkaTlsDir" -}}/run/secrets/rlhf-kafka{{- end -}}

{{- define "rlhf.kafkaTlsVolumeMount" -}}
{{- if .Values.kafka.tls.existingSecret -}}
- {name: kafka-tls, mountPath: {{ include "rlhf.kafkaTlsDir" . }}, readOnly: true}
{{- end -}}
{{- end -}}

{{- define "rlhf.kafkaTlsVolume" -}}
{{- with .Values.kafka.tls -}}
{{- if .existingSecret -}}
- name: kafka-tls
  secret:
    secretName: {{ .existingSecret }}
    items:
      - {key: ca.crt, path: ca.crt}
      {{- if .clientCertificate }}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      {{- end }}
    # 0440: the owner and the pod's fsGroup read it.
    defaultMode: 288
{{- end -}}
{{- end -}}
{{- end -}}
