{{/* Chart name, truncated to a DNS label. */}}
{{- define "csi-spdk.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name of every object. */}}
{{- define "csi-spdk.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "csi-spdk.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "csi-spdk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: csi-spdk
{{- end -}}

{{/* Selector labels of one component (controller, node, spdk-tgt). */}}
{{- define "csi-spdk.selectorLabels" -}}
app.kubernetes.io/name: {{ include "csi-spdk.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "csi-spdk.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- define "csi-spdk.controllerServiceAccount" -}}
{{- if .Values.serviceAccount.controller.create -}}
{{- default (printf "%s-controller" (include "csi-spdk.fullname" .)) .Values.serviceAccount.controller.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.controller.name -}}
{{- end -}}
{{- end -}}

{{- define "csi-spdk.nodeServiceAccount" -}}
{{- if .Values.serviceAccount.node.create -}}
{{- default (printf "%s-node" (include "csi-spdk.fullname" .)) .Values.serviceAccount.node.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.node.name -}}
{{- end -}}
{{- end -}}

{{/* Host directory of the node plugin's CSI socket, and the socket itself. */}}
{{- define "csi-spdk.nodePluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end -}}

{{/* The local spdk_tgt RPC address the node plugin reports SSDs from. */}}
{{- define "csi-spdk.nodeSpdkRpc" -}}
{{- if .Values.node.spdkRpc -}}
{{- .Values.node.spdkRpc -}}
{{- else if .Values.spdkTgt.enabled -}}
{{- printf "unix://%s/%s" (trimSuffix "/" .Values.spdkTgt.rpcSocketDir) .Values.spdkTgt.rpcSocketName -}}
{{- end -}}
{{- end -}}

{{/* Common leader-election flags of the controller sidecars. */}}
{{- define "csi-spdk.leaderElectionArgs" -}}
- --leader-election=true
- --leader-election-namespace=$(NAMESPACE)
- --leader-election-lease-duration={{ .Values.controller.leaderElection.leaseDuration }}
- --leader-election-renew-deadline={{ .Values.controller.leaderElection.renewDeadline }}
- --leader-election-retry-period={{ .Values.controller.leaderElection.retryPeriod }}
{{- end -}}

{{/* Where the controller finds its agent client certificate. */}}
{{- define "csi-spdk.agentTlsDir" -}}/etc/csi-spdk/agent-tls{{- end -}}

{{/* Secret names of the agent's server and the controller's client certificate. */}}
{{- define "csi-spdk.agentServerSecret" -}}
{{- default (printf "%s-agent-server" (include "csi-spdk.fullname" .)) .Values.agent.tls.serverSecret -}}
{{- end -}}
{{- define "csi-spdk.agentClientSecret" -}}
{{- default (printf "%s-agent-client" (include "csi-spdk.fullname" .)) .Values.agent.tls.clientSecret -}}
{{- end -}}

{{/* "true" when some target is reached through a host:port agent (the
controller then mounts the client certificate). */}}
{{- define "csi-spdk.remoteAgents" -}}
{{- range .Values.config.targets -}}
{{- if and .agent (not (hasPrefix "unix:" (toString .agent.address))) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* The targets with the chart's client certificate filled in for host:port agents. */}}
{{- define "csi-spdk.targets" -}}
{{- $dir := include "csi-spdk.agentTlsDir" . -}}
{{- $out := list -}}
{{- range .Values.config.targets -}}
{{- $t := deepCopy . -}}
{{- if and $t.agent (not (hasPrefix "unix:" (toString $t.agent.address))) (not $t.agent.tls) -}}
{{- $_ := set $t.agent "tls" (dict "caFile" (printf "%s/ca.crt" $dir) "certFile" (printf "%s/tls.crt" $dir) "keyFile" (printf "%s/tls.key" $dir)) -}}
{{- end -}}
{{- $out = append $out $t -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The controller config document (docs/DESIGN.md), as YAML. */}}
{{- define "csi-spdk.controllerConfig" -}}
{{- $cfg := dict "targets" (include "csi-spdk.targets" . | fromYamlArray) "thinOvercommitRatio" .Values.config.thinOvercommitRatio -}}
{{- if not (kindIs "invalid" .Values.config.defaultVolumeSize) -}}
{{- $_ := set $cfg "defaultVolumeSize" (int64 .Values.config.defaultVolumeSize) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The agent's pool file (agent/pools.py) from agent.pools and
agent.nodePools: camelCase values, snake_case file, as JSON (a YAML subset the
agent reads) so that a PCI address such as 0000:01:00.0 stays a string (YAML
1.1 reads it as a base-60 number). agent.nodePools becomes the file's
`nodes`: the agent of the node of that name (--node-name, the Pod's
spec.nodeName) uses that list instead of `pools`. Fails on a pool name given
twice in one list. */}}
{{- define "csi-spdk.agentPoolFile" -}}
{{- $file := dict "pools" (include "csi-spdk.agentPoolList" (dict "pools" .Values.agent.pools "where" "agent.pools") | fromJsonArray) }}
{{- if .Values.agent.nodePools }}
{{- $nodes := dict }}
{{- range $node, $pools := .Values.agent.nodePools }}
{{- $_ := set $nodes $node (include "csi-spdk.agentPoolList" (dict "pools" $pools "where" (printf "agent.nodePools.%s" $node)) | fromJsonArray) }}
{{- end }}
{{- $_ := set $file "nodes" $nodes }}
{{- end }}
{{- toPrettyJson $file }}
{{- end -}}

{{/* One pool list (dict "pools" list "where" "agent.pools") as a JSON array. */}}
{{- define "csi-spdk.agentPoolList" -}}
{{- $pools := list }}
{{- $seen := dict }}
{{- $where := .where }}
{{- range $p := .pools }}
{{- if hasKey $seen $p.name }}
{{- fail (printf "%s: pool %q is defined twice (a pool is one lvstore)" $where $p.name) }}
{{- end }}
{{- $_ := set $seen $p.name true }}
{{- $devs := list }}
{{- range $d := $p.devices }}
{{- $dev := dict }}
{{- if hasKey $d "pci" }}
{{- $_ := set $dev "pci" $d.pci }}
{{- if hasKey $d "initialize" }}{{ $_ := set $dev "initialize" $d.initialize }}{{ end }}
{{- else }}
{{- $_ := set $dev "path" $d.path }}
{{- $_ := set $dev "io" ($d.io | default "aio") }}
{{- end }}
{{- $devs = append $devs $dev }}
{{- end }}
{{- $pool := dict "name" $p.name "devices" $devs }}
{{- with $p.clusterSize }}{{ $_ := set $pool "cluster_size" . }}{{ end }}
{{- with $p.metadataRatio }}{{ $_ := set $pool "metadata_ratio" (int .) }}{{ end }}
{{- $pools = append $pools $pool }}
{{- end }}
{{- toJson $pools }}
{{- end -}}

{{/* Every pool of agent.pools and of each agent.nodePools list, as a JSON
array (what the DaemonSet's mounts and privileges must cover: one Pod spec
for every storage node). */}}
{{- define "csi-spdk.agentAllPools" -}}
{{- $all := concat (.Values.agent.pools | default list) }}
{{- range $_, $pools := .Values.agent.nodePools }}
{{- $all = concat $all $pools }}
{{- end }}
{{- toJson $all }}
{{- end -}}

{{/* Host directories of the pools' file devices outside /dev (each mounted
into spdk_tgt and the agent at the same path), one per line. */}}
{{- define "csi-spdk.agentPoolDirs" -}}
{{- $dirs := dict }}
{{- range $p := include "csi-spdk.agentAllPools" . | fromJsonArray }}
{{- range $d := $p.devices }}
{{- if and (hasKey $d "path") (not (hasPrefix "/dev/" $d.path)) }}
{{- $_ := set $dirs (dir $d.path) true }}
{{- end }}
{{- end }}
{{- end }}
{{- range $k, $_ := $dirs }}
{{ $k }}
{{- end }}
{{- end -}}

{{/* "true" when a pool names a block device under /dev: the agent probes it
for signatures (never reformat), which the device cgroup allows only a
privileged container. */}}
{{- define "csi-spdk.agentProbesDevices" -}}
{{- range $p := include "csi-spdk.agentAllPools" . | fromJsonArray }}
{{- range $d := $p.devices }}
{{- if and (hasKey $d "path") (hasPrefix "/dev/" $d.path) }}true{{ end }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
startupProbe + livenessProbe of one container: (dict "handler" <probe action
YAML> "probes" <.Values.x.probes>). The liveness probe starts only once the
startup probe succeeded, so it needs no initial delay.
*/}}
{{- define "csi-spdk.probes" -}}
startupProbe:
  {{- .handler | nindent 2 }}
  {{- toYaml .probes.startup | nindent 2 }}
livenessProbe:
  {{- .handler | nindent 2 }}
  {{- toYaml .probes.liveness | nindent 2 }}
{{- end }}
