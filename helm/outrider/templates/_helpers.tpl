{{/*
The chart name.
*/}}
{{- define "outrider.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The RayService's name. KubeRay derives its RayCluster (+6 characters) and Service names
(+"-serve-svc") from it and rejects RayService names over 47 characters, so the name is cut to
47; it must also be a DNS-1035 label (start with a letter).
*/}}
{{- define "outrider.fullname" -}}
{{- $name := "" }}
{{- if .Values.fullnameOverride }}
{{- $name = .Values.fullnameOverride }}
{{- else }}
{{- $base := default .Chart.Name .Values.nameOverride }}
{{- if contains $base .Release.Name }}
{{- $name = .Release.Name }}
{{- else }}
{{- $name = printf "%s-%s" .Release.Name $base }}
{{- end }}
{{- end }}
{{- $name = $name | trunc 47 | trimSuffix "-" }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayService name %q is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter); set fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "outrider.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "outrider.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outrider.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outrider.labels" -}}
helm.sh/chart: {{ include "outrider.chart" . }}
{{ include "outrider.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "outrider.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Enabled worker groups as a list of {name, spec}: `worker` (named by its groupName) first, then
additionalWorkerGroups in key order.
*/}}
{{- define "outrider.workerGroups" -}}
{{- $groups := list }}
{{- if not .Values.worker.disabled }}
{{- $groups = append $groups (dict "name" .Values.worker.groupName "where" "worker" "spec" .Values.worker) }}
{{- end }}
{{- range $name, $spec := .Values.additionalWorkerGroups }}
{{- if not $spec.disabled }}
{{- $groups = append $groups (dict "name" $name "where" (printf "additionalWorkerGroups.%s" $name) "spec" $spec) }}
{{- end }}
{{- end }}
{{- toJson $groups }}
{{- end }}

{{/*
The nvidia.com/gpu limit of a group (0 when unset).
*/}}
{{- define "outrider.gpus" -}}
{{- $limits := (.resources | default dict).limits | default dict }}
{{- index $limits "nvidia.com/gpu" | default 0 | int }}
{{- end }}

{{/*
The Ray custom resource a pool's workers take one unit of, from the outrider config.
Args: root, pool ("target" | "drafter"), where (values path, for messages).
*/}}
{{- define "outrider.poolResource" -}}
{{- $o := .root.Values.outrider | default dict }}
{{- $resource := "" }}
{{- if eq .pool "target" }}
{{- $resource = ((($o.target | default dict).pool | default dict).resource | default "") }}
{{- if not $resource }}
{{- fail (printf "%s.pool is target but outrider.target.pool.resource is not set: name the Ray resource the target pool advertises (e.g. target_gpu)" .where) }}
{{- end }}
{{- else if eq .pool "drafter" }}
{{- if not $o.speculative }}
{{- fail (printf "%s.pool is drafter but outrider.speculative is not set: set it, or disable the group" .where) }}
{{- end }}
{{- $resource = (($o.speculative.pool | default dict).resource | default "") }}
{{- if not $resource }}
{{- fail (printf "%s.pool is drafter but outrider.speculative.pool.resource is not set: name the Ray resource the drafter pool advertises (e.g. draft_gpu)" .where) }}
{{- end }}
{{- end }}
{{- $resource }}
{{- end }}

{{/*
The Ray custom resources a group advertises: its rayResources plus `poolSlots` (default: the
nvidia.com/gpu limit) units of its pool's resource. Args: root, group ({name, where, spec}).
*/}}
{{- define "outrider.rayResources" -}}
{{- $g := .group.spec }}
{{- $res := dict }}
{{- range $k, $v := ($g.rayResources | default dict) }}
{{- $_ := set $res $k (int $v) }}
{{- end }}
{{- if $g.pool }}
{{- $resource := include "outrider.poolResource" (dict "root" .root "pool" $g.pool "where" .group.where) }}
{{- $slots := int (ternary (include "outrider.gpus" $g) $g.poolSlots (kindIs "invalid" $g.poolSlots)) }}
{{- if lt $slots 1 }}
{{- fail (printf "%s: a pool group needs poolSlots >= 1 (default: its nvidia.com/gpu limit, which is 0)" .group.where) }}
{{- end }}
{{- $_ := set $res $resource $slots }}
{{- end }}
{{- toJson $res }}
{{- end }}

{{/*
Fail unless the enabled groups of each pool can hold one replica's worker group: the sum of
maxReplicas x poolSlots over the pool's groups must be at least TP x PP of that outrider group.
*/}}
{{- define "outrider.checkPools" -}}
{{- $root := . }}
{{- $o := .Values.outrider | default dict }}
{{- $groups := include "outrider.workerGroups" . | fromJsonArray }}
{{- $have := dict "target" 0 "drafter" 0 }}
{{- $names := dict }}
{{- range $groups }}
{{- $spec := .spec }}
{{- if hasKey $names .name }}
{{- fail (printf "%s: worker group name %q is used twice" .where .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- $requests := (($spec.resources | default dict).requests | default dict) }}
{{- if hasKey $requests "nvidia.com/gpu" }}
{{- if ne (int (index $requests "nvidia.com/gpu")) (int (include "outrider.gpus" $spec)) }}
{{- fail (printf "%s.resources: requests and limits of nvidia.com/gpu must be equal (Kubernetes requires it for extended resources)" .where) }}
{{- end }}
{{- end }}
{{- if lt (int $spec.maxReplicas) (int $spec.minReplicas) }}
{{- fail (printf "%s: maxReplicas (%d) is below minReplicas (%d)" .where (int $spec.maxReplicas) (int $spec.minReplicas)) }}
{{- end }}
{{- if $spec.pool }}
{{- if not (has $spec.pool (list "target" "drafter")) }}
{{- fail (printf "%s.pool: %q is not a pool; use target, drafter or \"\"" .where $spec.pool) }}
{{- end }}
{{- if hasKey ($spec.rayStartParams | default dict) "resources" }}
{{- fail (printf "%s.rayStartParams.resources: the chart writes --resources itself; put extra Ray resources in %s.rayResources" .where .where) }}
{{- end }}
{{- $res := include "outrider.rayResources" (dict "root" $root "group" .) | fromJson }}
{{- $resource := include "outrider.poolResource" (dict "root" $root "pool" $spec.pool "where" .where) }}
{{- $units := mul (int (index $res $resource)) (int $spec.maxReplicas) }}
{{- $_ := set $have $spec.pool (add (index $have $spec.pool) $units) }}
{{- end }}
{{- end }}
{{- $tpar := (($o.target | default dict).parallel | default dict) }}
{{- $tneed := mul (int ($tpar.tensor_parallel_size | default 1)) (int ($tpar.pipeline_parallel_size | default 1)) }}
{{- if lt (int (index $have "target")) (int $tneed) }}
{{- fail (printf "the worker groups with pool: target offer %d units of the target pool (maxReplicas x poolSlots) but outrider.target needs %d (tensor_parallel_size x pipeline_parallel_size)" (int (index $have "target")) (int $tneed)) }}
{{- end }}
{{- with $o.speculative }}
{{- $dtp := .draft_tensor_parallel_size | default .tensor_parallel_size | default 1 }}
{{- $dneed := mul (int $dtp) (int (.pipeline_parallel_size | default 1)) }}
{{- if lt (int (index $have "drafter")) (int $dneed) }}
{{- fail (printf "the worker groups with pool: drafter offer %d units of the drafter pool (maxReplicas x poolSlots) but outrider.speculative needs %d (tensor_parallel_size x pipeline_parallel_size)" (int (index $have "drafter")) (int $dneed)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The Serve config (serveConfigV2): the application is outrider's typed app builder with the
`outrider` values as its args, and one deployment override for the `outrider` deployment.
*/}}
{{- define "outrider.serveConfig" -}}
{{- $deployment := merge (dict "name" "outrider") (deepCopy (.Values.serve.deployment | default dict)) }}
{{- $app := dict "name" "outrider" "route_prefix" .Values.serve.route_prefix "import_path" "outrider.cluster.app:app_builder" "args" (.Values.outrider | default dict) "deployments" (list $deployment) }}
{{- $config := dict "proxy_location" .Values.serve.proxy_location "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) }}
{{- toYaml $config }}
{{- end }}

{{/*
Container env: common.containerEnv then the group's own.
*/}}
{{- define "outrider.env" -}}
{{- concat (.root.Values.common.containerEnv | default list) (.spec.containerEnv | default list) | toJson }}
{{- end }}
