{{/*
NetworkPolicies, ingress and egress, one per component, built from one table of the design's
flows (../../../../shared/DESIGN.md, "Services"): who calls whose gRPC port, who talks to Kafka.
Everything a policy does not admit is refused, in both directions.

  rlhf.grpcFlows      "from>to" pairs: the callers of each gRPC service (gateway>reward only
                      with gateway.bestOf.enabled: the gateway ranks best_of samples;
                      judge>policy only with judge.throughPolicy: the judge asks the policy).
                      The judge's own callers are people and jobs outside the release
                      (`rlhf label-ai --judge`, `rlhf eval --judge`): networkPolicy.judgeIngressFrom
  rlhf.kafkaClients   the components that produce to or consume from Kafka
  rlhf.networkPolicy  the NetworkPolicy of one component: (dict "root" $ "component" "policy"
                      "annotations" (dict ...))
*/}}

{{- define "rlhf.grpcFlows" -}}
gateway>policy trainer>policy rollout>policy rollout>reward rollout>reference refresh>reward
{{- if .Values.gateway.bestOf.enabled }} gateway>reward{{ end -}}
{{- if .Values.judge.throughPolicy }} judge>policy{{ end -}}
{{- end -}}

{{- define "rlhf.kafkaClients" -}}
policy gateway rollout trainer curator refresh topics judge
{{- end -}}

{{/* "true" when the component renders pods in this release, else "". */}}
{{- define "rlhf.componentEnabled" -}}
{{- $v := .root.Values -}}
{{- if eq .component "kafka" -}}{{ ternary "true" "" $v.kafka.local.enabled }}
{{- else if eq .component "topics" -}}{{ ternary "true" "" $v.topics.enabled }}
{{- else if eq .component "refresh" -}}{{ ternary "true" "" (and $v.refresh.enabled $v.reward.enabled) }}
{{- else -}}{{ ternary "true" "" (index $v .component).enabled }}
{{- end -}}
{{- end -}}

{{/* A NetworkPolicyPeer selecting one component's pods: (dict "root" $ "component" "reward"). */}}
{{- define "rlhf.peer" -}}
{{- toJson (dict "podSelector" (dict "matchLabels" (fromYaml (include "rlhf.selectorLabels" .)))) -}}
{{- end -}}

{{/* The ports a component is scraped on. */}}
{{- define "rlhf.metricsPorts" -}}
{{- $v := .root.Values -}}
{{- $ports := list -}}
{{- if has .component (list "policy" "reward" "reference") -}}
{{- $ports = list (index $v .component).metricsPort $v.triton.metricsPort -}}
{{- else if eq .component "judge" -}}{{/* Triton's port only where it runs its own model */}}
{{- $ports = list $v.judge.metricsPort -}}
{{- if not (include "rlhf.judgePolicyAddress" .) }}{{ $ports = append $ports $v.triton.metricsPort }}{{ end -}}
{{- else if eq .component "gateway" -}}
{{- $ports = list $v.gateway.port -}}{{/* /metrics is on the HTTP port */}}
{{- else if has .component (list "rollout" "trainer" "curator" "refresh") -}}
{{- $ports = list (index $v .component).metricsPort -}}
{{- end -}}
{{- toJson $ports -}}
{{- end -}}

{{/* Broker ports: networkPolicy.kafka.ports, else every port of the bootstrap servers. */}}
{{- define "rlhf.kafkaPorts" -}}
{{- $ports := list -}}
{{- if .Values.networkPolicy.kafka.ports -}}
{{- range .Values.networkPolicy.kafka.ports }}{{ $ports = append $ports (int .) }}{{ end -}}
{{- else -}}
{{- range splitList "," (include "rlhf.kafkaBootstrap" .) }}
{{- $ports = append $ports (regexFind "[0-9]+$" . | int) -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $ports) -}}
{{- end -}}

{{/* Peers the Kafka clients may reach; [] means any address. */}}
{{- define "rlhf.kafkaPeers" -}}
{{- $v := .Values -}}
{{- if $v.networkPolicy.kafka.to -}}
{{- toJson $v.networkPolicy.kafka.to -}}
{{- else if $v.kafka.local.enabled -}}
[{{ include "rlhf.peer" (dict "root" . "component" "kafka") }}]
{{- else if not $v.kafka.bootstrapServers -}}
{{- $ns := default .Release.Namespace $v.kafka.strimzi.namespace -}}
{{- toJson (list (dict
    "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" $ns))
    "podSelector" (dict "matchLabels" (dict "strimzi.io/cluster" $v.kafka.strimzi.clusterName "strimzi.io/kind" "Kafka")))) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{- define "rlhf.tcpPorts" -}}
{{- $out := list -}}
{{- range . }}{{ $out = append $out (dict "port" (int .) "protocol" "TCP") }}{{ end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "rlhf.networkPolicy" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $me := .component -}}
{{- $ctx := dict "root" $root "component" $me -}}
{{- $ingress := list -}}
{{- $egress := list -}}
{{- /* Cluster DNS, for every pod. */ -}}
{{- $egress = append $egress (dict "to" $v.networkPolicy.dnsTo "ports" (list (dict "port" 53 "protocol" "UDP") (dict "port" 53 "protocol" "TCP"))) -}}
{{- /* gRPC: each flow is an egress rule of its caller and an ingress rule of its callee. */ -}}
{{- range $flow := splitList " " (include "rlhf.grpcFlows" $root) -}}
{{- $from := first (splitList ">" $flow) -}}
{{- $to := last (splitList ">" $flow) -}}
{{- if and (include "rlhf.componentEnabled" (dict "root" $root "component" $from)) (include "rlhf.componentEnabled" (dict "root" $root "component" $to)) -}}
{{- $flowPorts := list (index $v $to).grpcPort -}}
{{- if and (eq $from "trainer") (eq $to "policy") -}}{{/* the weight push's side channel */}}
{{- $flowPorts = append $flowPorts $v.policy.weightsSideChannelPort -}}
{{- end -}}
{{- $ports := fromJsonArray (include "rlhf.tcpPorts" $flowPorts) -}}
{{- if eq $me $to -}}
{{- $ingress = append $ingress (dict "from" (list (fromJson (include "rlhf.peer" (dict "root" $root "component" $from)))) "ports" $ports) -}}
{{- end -}}
{{- if eq $me $from -}}
{{- $egress = append $egress (dict "to" (list (fromJson (include "rlhf.peer" (dict "root" $root "component" $to)))) "ports" $ports) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* The trainer's ranks: the rendezvous port and the collectives' own ports (NCCL, gloo). */ -}}
{{- if eq $me "trainer" -}}
{{- $ranks := list (fromJson (include "rlhf.peer" $ctx)) -}}
{{- $ingress = append $ingress (dict "from" $ranks) -}}
{{- $egress = append $egress (dict "to" $ranks) -}}
{{- end -}}
{{- /* Kafka. */ -}}
{{- $kafkaPorts := fromJsonArray (include "rlhf.tcpPorts" (fromJsonArray (include "rlhf.kafkaPorts" $root))) -}}
{{- if has $me (splitList " " (include "rlhf.kafkaClients" $root)) -}}
{{- $peers := fromJsonArray (include "rlhf.kafkaPeers" $root) -}}
{{- if $peers -}}
{{- $egress = append $egress (dict "to" $peers "ports" $kafkaPorts) -}}
{{- else -}}
{{- $egress = append $egress (dict "ports" $kafkaPorts) -}}
{{- end -}}
{{- end -}}
{{- if eq $me "kafka" -}}
{{- $clients := list -}}
{{- range $client := splitList " " (include "rlhf.kafkaClients" $root) -}}
{{- if include "rlhf.componentEnabled" (dict "root" $root "component" $client) -}}
{{- $clients = append $clients (fromJson (include "rlhf.peer" (dict "root" $root "component" $client))) -}}
{{- end -}}
{{- end -}}
{{- $local := fromJsonArray (include "rlhf.tcpPorts" (list $v.kafka.local.port)) -}}
{{- $ingress = append $ingress (dict "from" $clients "ports" $local) -}}
{{- /* The broker reaches its own advertised listener. */ -}}
{{- $ingress = append $ingress (dict "from" (list (fromJson (include "rlhf.peer" $ctx))) "ports" $local) -}}
{{- $egress = append $egress (dict "to" (list (fromJson (include "rlhf.peer" $ctx))) "ports" $local) -}}
{{- end -}}
{{- /* The gateway's users. */ -}}
{{- if eq $me "gateway" -}}
{{- $rule := dict "ports" (fromJsonArray (include "rlhf.tcpPorts" (list $v.gateway.port))) -}}
{{- with $v.networkPolicy.ingressFrom }}{{ $_ := set $rule "from" . }}{{ end -}}
{{- $ingress = append $ingress $rule -}}
{{- end -}}
{{- /* The judge's callers; and another release's PolicyService (judge.policyAddress), at any
address on its port, as for external Kafka brokers. */ -}}
{{- if eq $me "judge" -}}
{{- $rule := dict "ports" (fromJsonArray (include "rlhf.tcpPorts" (list $v.judge.grpcPort))) -}}
{{- with $v.networkPolicy.judgeIngressFrom }}{{ $_ := set $rule "from" . }}{{ end -}}
{{- $ingress = append $ingress $rule -}}
{{- with $v.judge.policyAddress -}}
{{- $egress = append $egress (dict "ports" (fromJsonArray (include "rlhf.tcpPorts" (list (regexFind "[0-9]+$" . | int))))) -}}
{{- end -}}
{{- end -}}
{{- /* Prometheus. */ -}}
{{- $metrics := fromJsonArray (include "rlhf.metricsPorts" $ctx) -}}
{{- if $metrics -}}
{{- $rule := dict "ports" (fromJsonArray (include "rlhf.tcpPorts" $metrics)) -}}
{{- with $v.networkPolicy.metricsFrom }}{{ $_ := set $rule "from" . }}{{ end -}}
{{- $ingress = append $ingress $rule -}}
{{- end -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "rlhf.componentName" $ctx }}
  labels:
    {{- include "rlhf.labels" $ctx | nindent 4 }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  podSelector:
    matchLabels:
      {{- include "rlhf.selectorLabels" $ctx | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    {{- toYaml $ingress | nindent 4 }}
  egress:
    {{- toYaml $egress | nindent 4 }}
{{- end -}}
