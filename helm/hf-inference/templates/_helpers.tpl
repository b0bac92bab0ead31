{{/* Names and labels. */}}
{{- define "hfi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hfi.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "hfi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hfi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "hfi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "hfi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "hfi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "hfi.serveServiceName" -}}
{{- printf "%s-serve" (include "hfi.fullname" .) -}}
{{- end -}}

{{- define "hfi.postgresName" -}}
{{- printf "%s-postgresql" (include "hfi.fullname" .) -}}
{{- end -}}

{{/* A profile's worker group name: a DNS label. */}}
{{- define "hfi.groupName" -}}
{{- . | replace "." "-" | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/*
The shape of one profile's worker pods, as YAML: gpus (whole GPUs per pod), replicasPerPod (how many replicas of
the profile one pod holds: 2 for a half-GPU profile), rayCpus, memory (a quantity).
*/}}
{{- define "hfi.workerShape" -}}
{{- $p := . -}}
{{- $w := $p.worker | default dict -}}
{{- $gpus := 0 -}}
{{- $perPod := 1 -}}
{{- if $p.accelerator -}}
{{- $gpus = int (ceil $p.accelerator.count) -}}
{{- $perPod = max 1 (int (floor (divf $gpus $p.accelerator.count))) -}}
{{- end -}}
{{- $cpus := default 1 $p.cpus -}}
{{- $rayCpus := int (ceil (mulf $cpus $perPod)) -}}
{{- if hasKey $w "rayCpus" -}}{{- $rayCpus = int $w.rayCpus -}}{{- end -}}
{{- $memory := "" -}}
{{- if $p.memory_gb -}}
{{- $memory = printf "%vGi" (mulf $p.memory_gb $perPod) -}}
{{- else if and $w.resources $w.resources.limits $w.resources.limits.memory -}}
{{- $memory = $w.resources.limits.memory -}}
{{- else -}}
{{- fail (printf "profiles[%s]: set memory_gb (or worker.resources.limits.memory) so its worker pods get a memory limit" $p.name) -}}
{{- end -}}
gpus: {{ $gpus }}
replicasPerPod: {{ $perPod }}
rayCpus: {{ $rayCpus }}
memory: {{ $memory | quote }}
{{- end -}}

{{/*
Checks a schema cannot make: names that must match across lists, and sizes that must fit. Each failure names the
field and says what to change.
*/}}
{{- define "hfi.validate" -}}
{{- if and .Values.spool.drainer.enabled (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) -}}
{{- fail (printf "spool.drainer.enabled: the node drainer is a native sidecar, which needs Kubernetes >= 1.29 (this cluster: %s); set spool.drainer.enabled=false, and the serving processes drain their spools themselves" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- $profiles := dict -}}
{{- $hasCpuProfile := false -}}
{{- range $p := .Values.profiles -}}
{{- if hasKey $profiles $p.name -}}
{{- fail (printf "profiles: profile %q is declared twice" $p.name) -}}
{{- end -}}
{{- $_ := set $profiles $p.name $p -}}
{{- $w := $p.worker | default dict -}}
{{- if and (hasKey $w "minReplicas") (hasKey $w "maxReplicas") (gt (int $w.minReplicas) (int $w.maxReplicas)) -}}
{{- fail (printf "profiles[%s].worker: minReplicas (%v) is above maxReplicas (%v)" $p.name $w.minReplicas $w.maxReplicas) -}}
{{- end -}}
{{- if $p.accelerator -}}
{{- if not (or $w.nodeSelector (hasKey $.Values.gpuNodeSelectors $p.accelerator.type)) -}}
{{- fail (printf "profiles[%s]: no node selector for GPU type %q: add it to gpuNodeSelectors or set profiles[%s].worker.nodeSelector" $p.name $p.accelerator.type $p.name) -}}
{{- end -}}
{{- else -}}
{{- $hasCpuProfile = true -}}
{{- end -}}
{{- $_ := include "hfi.workerShape" $p -}}
{{- end -}}
{{- $ids := dict -}}
{{- $minByProfile := dict -}}
{{- $poolNames := list -}}
{{- range .Values.pools -}}
{{- if has .name $poolNames -}}
{{- fail (printf "pools: pool %q is listed twice" .name) -}}
{{- end -}}
{{- $poolNames = append $poolNames .name -}}
{{- end -}}
{{- range $m := .Values.models -}}
{{- $key := lower $m.id -}}
{{- if hasKey $ids $key -}}
{{- fail (printf "models: model %q is listed twice" $m.id) -}}
{{- end -}}
{{- $_ := set $ids $key true -}}
{{- if not (hasKey $profiles $m.hardware_profile) -}}
{{- fail (printf "models[%s].hardware_profile: unknown profile %q; declared profiles: %s (each profile in values.profiles becomes a Ray worker group)" $m.id $m.hardware_profile (keys $profiles | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if $m.pool -}}
{{- if not (has $m.pool $poolNames) -}}
{{- fail (printf "models[%s].pool: unknown pool %q; declared pools: %s" $m.id $m.pool ($poolNames | sortAlpha | join ", ")) -}}
{{- end -}}
{{- else -}}
{{- $min := 1 -}}
{{- if $m.autoscaling -}}
{{- $min = int (default 1 $m.autoscaling.min_replicas) -}}
{{- if hasKey $m.autoscaling "min_replicas" -}}{{- $min = int $m.autoscaling.min_replicas -}}{{- end -}}
{{- if and (hasKey $m.autoscaling "max_replicas") (gt $min (int $m.autoscaling.max_replicas)) -}}
{{- fail (printf "models[%s].autoscaling: min_replicas (%d) is above max_replicas (%v)" $m.id $min $m.autoscaling.max_replicas) -}}
{{- end -}}
{{- else if hasKey $m "replicas" -}}
{{- $min = int $m.replicas -}}
{{- end -}}
{{- $_ := set $minByProfile $m.hardware_profile (add (get $minByProfile $m.hardware_profile | default 0) $min) -}}
{{- end -}}
{{- end -}}
{{- range $p := .Values.pools -}}
{{- $pp := default "cpu-basic" $p.hardware_profile -}}
{{- if not (hasKey $profiles $pp) -}}
{{- fail (printf "pools[%s].hardware_profile: unknown profile %q; declared profiles: %s" $p.name $pp (keys $profiles | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $_ := set $minByProfile $pp (add (get $minByProfile $pp | default 0) (int (default 1 $p.replicas))) -}}
{{- end -}}
{{- range $name, $needed := $minByProfile -}}
{{- $p := get $profiles $name -}}
{{- $w := $p.worker | default dict -}}
{{- if hasKey $w "maxReplicas" -}}
{{- $shape := include "hfi.workerShape" $p | fromYaml -}}
{{- $room := mul (int $w.maxReplicas) (int $shape.replicasPerPod) -}}
{{- if gt (int $needed) (int $room) -}}
{{- fail (printf "profiles[%s].worker.maxReplicas: its models need at least %d replicas but %v pods hold only %d; raise maxReplicas or lower the models' replicas" $name $needed $w.maxReplicas $room) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $s := .Values.shutdown -}}
{{- if lt (sub (sub (int $s.terminationGracePeriodSeconds) (int $s.rayStopGracePeriodSeconds)) 15) 10 -}}
{{- fail (printf "shutdown: terminationGracePeriodSeconds (%v) must leave at least 25 s after rayStopGracePeriodSeconds (%v): 10 s or more to drain the charge spool, and 15 s of margin" $s.terminationGracePeriodSeconds $s.rayStopGracePeriodSeconds) -}}
{{- end -}}
{{- $ingressCpus := mulf .Values.serve.ingress.numCpus .Values.serve.ingress.replicas -}}
{{- if and (lt (float64 .Values.head.rayCpus) $ingressCpus) (not $hasCpuProfile) -}}
{{- fail (printf "head.rayCpus (%v) is below the ingress's %v CPUs and no CPU profile is declared: the ingress deployment would have nowhere to run" .Values.head.rayCpus $ingressCpus) -}}
{{- end -}}
{{- end -}}

{{/* The Serve config (serveConfigV2): one application built by serving.app:build_app from these args. */}}
{{- define "hfi.serveConfig" -}}
{{- $profiles := list -}}
{{- range .Values.profiles -}}
{{- $profiles = append $profiles (omit . "worker") -}}
{{- end -}}
{{- $args := dict
  "models" .Values.models
  "pools" (.Values.pools | default list)
  "profiles" $profiles
  "billing" (dict "mode" .Values.serve.billingMode)
  "host" "0.0.0.0"
  "hf_cache_dir" (printf "%s/huggingface/hub" .Values.modelCache.mountPath)
  "model_store" (printf "%s/models" .Values.modelCache.mountPath)
  "offline" .Values.serve.offline
  "ingress_replicas" .Values.serve.ingress.replicas
  "ingress_num_cpus" .Values.serve.ingress.numCpus
  "cpu_replicas_on_gpu_nodes" .Values.serve.cpuReplicasOnGpuNodes
-}}
{{- /* One application per model, routed at /models/{id} (HAProxy sends its requests straight to its replicas); a
  model that scales to zero (autoscaling.min_replicas 0) has no route of its own: the router answers for it while it
  has no replica. Then the router at / (serving.app.applications lays out the same). */ -}}
{{- $apps := list -}}
{{- $pooled := list -}}
{{- range .Values.models -}}
{{- if .pool -}}
{{- $pooled = append $pooled .pool -}}
{{- else -}}
{{- $name := printf "model-%s" (regexReplaceAll "[^A-Za-z0-9_-]" (replace "/" "--" .id) "-") -}}
{{- $modelArgs := merge (dict "model" .id) (deepCopy $args) -}}
{{- $app := dict "name" $name "route_prefix" (printf "/models/%s" .id) "import_path" "serving.app:build_model_app" "args" $modelArgs -}}
{{- if .autoscaling -}}{{- if hasKey .autoscaling "min_replicas" -}}{{- if eq (int .autoscaling.min_replicas) 0 -}}
{{- $_ := set $app "route_prefix" nil -}}
{{- end -}}{{- end -}}{{- end -}}
{{- $apps = append $apps $app -}}
{{- end -}}
{{- end -}}
{{- /* One application per pool with models: the first takes /models (what no model application claims). */ -}}
{{- $first := true -}}
{{- range .Values.pools -}}
{{- if has .name $pooled -}}
{{- $prefix := ternary "/models" (printf "/pools/%s" .name) $first -}}
{{- $first = false -}}
{{- $poolArgs := merge (dict "pool" .name) (deepCopy $args) -}}
{{- $apps = append $apps (dict "name" (printf "pool-%s" .name) "route_prefix" $prefix "import_path" "serving.app:build_pool_app" "args" $poolArgs) -}}
{{- end -}}
{{- end -}}
{{- $apps = append $apps (dict "name" "hf-inference" "route_prefix" "/" "import_path" "serving.app:build_ingress_app" "args" $args) -}}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" .Values.serve.port)
  "applications" $apps
-}}
{{- toYaml $config -}}
{{- end -}}

{{/* Environment of every Ray container. Secrets only by reference. */}}
{{- define "hfi.env" -}}
{{- if .Values.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.hfToken.existingSecret | quote }}, key: {{ .Values.hfToken.key | quote }}}
{{- end }}
{{- if eq .Values.database.type "external" }}
- name: HFI_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.database.external.existingSecret | quote }}, key: {{ .Values.database.external.key | quote }}}
{{- else }}
- name: HFI_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.database.bundled.existingSecret | quote }}, key: {{ .Values.database.bundled.passwordKey | quote }}}
{{- with .Values.database.bundled }}
# Kubernetes expands $(HFI_DATABASE_PASSWORD) from the variable above: the password stays in its Secret.
- name: HFI_DATABASE_URL
  value: {{ printf "postgresql+psycopg://%s:$(HFI_DATABASE_PASSWORD)@%s.%s.svc:5432/%s" .user (include "hfi.postgresName" $) $.Release.Namespace .database | quote }}
{{- end }}
{{- end }}
- name: HFI_SPOOL_DIR
  value: {{ .Values.spool.mountPath | quote }}
# Serve's throughput mode (replicas take HTTP on their own ports) and, with it, HAProxy on every node; both are
# read by Ray's processes at start, so they are set on head and workers alike.
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
{{- if .Values.serve.haproxy }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
{{- with .Values.serve.haproxyLauncher }}
- name: RAY_SERVE_HAPROXY_BINARY_PATH
  value: {{ . | quote }}
{{- end }}
{{- end }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.modelCache.mountPath | quote }}
- name: HF_HUB_CACHE
  value: {{ printf "%s/huggingface/hub" .Values.modelCache.mountPath | quote }}
- name: HFI_MODEL_STORE
  value: {{ printf "%s/models" .Values.modelCache.mountPath | quote }}
{{- if .Values.serve.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- if eq .Values.rayAuth.mode "disabled" }}
# Ray 2.60 turns its token auth on by default; rayAuth.mode: disabled says otherwise (keep networkPolicy on).
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "hfi.volume" -}}
{{- $v := .volume -}}
- name: {{ .name }}
{{- if eq $v.type "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ $v.existingClaim | quote }}
{{- else if eq $v.type "hostPath" }}
  hostPath:
    path: {{ .hostPath | quote }}
    type: DirectoryOrCreate
{{- else if eq $v.type "ephemeral" }}
  ephemeral:
    volumeClaimTemplate:
      spec:
        accessModes: [ReadWriteOnce]
        {{- with $v.storageClass }}
        storageClassName: {{ . | quote }}
        {{- end }}
        resources:
          requests:
            storage: {{ $v.size | quote }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $v.size | quote }}
{{- end }}
{{- end -}}

{{- define "hfi.volumes" -}}
{{ include "hfi.volume" (dict "name" "spool" "volume" .Values.spool.volume "hostPath" (include "hfi.spoolHostPath" .)) }}
{{ include "hfi.volume" (dict "name" "model-cache" "volume" .Values.modelCache.volume) }}
# Ray's object store lives in shared memory; the container default (64 MiB) is too small.
- name: dshm
  emptyDir:
    medium: Memory
{{- end -}}

{{- define "hfi.volumeMounts" -}}
- {name: spool, mountPath: {{ .Values.spool.mountPath | quote }}}
- {name: model-cache, mountPath: {{ .Values.modelCache.mountPath | quote }}}
- {name: dshm, mountPath: /dev/shm}
{{- end -}}

{{/* Pod-level fields every Ray pod shares. */}}
{{- define "hfi.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
# The preStop hook (hfi.preStop) stops Ray and drains the spool within this; the drainer sidecar
# (hfi.spoolDrainer) stops after it, in the margin it leaves.
terminationGracePeriodSeconds: {{ .Values.shutdown.terminationGracePeriodSeconds }}
{{- $prepareSpool := and (eq .Values.spool.volume.type "hostPath") .Values.spool.volume.prepareHostPath }}
{{- if or $prepareSpool .Values.spool.drainer.enabled }}
initContainers:
{{- if $prepareSpool }}
{{- $user := (.Values.podSecurityContext | default dict).runAsUser | default 1000 }}
{{- $group := (.Values.podSecurityContext | default dict).runAsGroup | default 100 }}
  # The node directory is created by the kubelet, owned by root: hand it to the pod's user (and nobody else).
  - name: spool-dir
    image: {{ include "hfi.image" . | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["/bin/sh", "-c", {{ printf "chown %v:%v %s && chmod 0770 %s" $user $group (.Values.spool.mountPath | squote) (.Values.spool.mountPath | squote) | quote }}]
    securityContext:
      runAsUser: 0
      runAsGroup: 0
      runAsNonRoot: false
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL], add: [CHOWN, FOWNER]}
    resources:
      requests: {cpu: 10m, memory: 16Mi}
      limits: {memory: 64Mi}
    volumeMounts:
      - {name: spool, mountPath: {{ .Values.spool.mountPath | quote }}}
{{- end }}
{{- if .Values.spool.drainer.enabled }}
  {{- include "hfi.spoolDrainer" . | nindent 2 }}
{{- end }}
{{- end }}
volumes:
  {{- include "hfi.volumes" . | nindent 2 }}
{{- end -}}

{{/* The spool's node directory (spool.volume.type hostPath): one per namespace and release, so that a replica
adopts only the spools of its own release (its own ledger). */}}
{{- define "hfi.spoolHostPath" -}}
{{- printf "%s/%s/%s" (trimSuffix "/" .Values.spool.volume.hostPath) .Release.Namespace (include "hfi.fullname" .) -}}
{{- end -}}

{{/*
The preStop hook of every Ray container. `ray stop` first: the replicas stop (one that closes cleanly delivers its
own spool first) and let go of their spool files. Then `hfi metering drain` delivers every file left whose process
is gone (waiting for this pod's own processes that still hold one), for the rest of the grace period less 15 s (the
drain's start and stop, `ray stop`'s last kills). Whatever it cannot deliver stays in the spool for a later replica
on the same volume to adopt. The container lives on meanwhile: its main process, `ray start --block`, takes the
SIGTERM exits of `ray stop` as expected (a process that needs a SIGKILL ends it, and the drain with it: then what
is left waits on the volume).
*/}}
{{- define "hfi.preStop" -}}
{{- $s := .Values.shutdown -}}
{{- $drain := sub (sub (int $s.terminationGracePeriodSeconds) (int $s.rayStopGracePeriodSeconds)) 15 -}}
exec:
  command:
    - /bin/sh
    - -c
    - {{ printf "ray stop --grace-period %d; exec hfi metering drain --spool-dir %s --timeout-s %d" (int $s.rayStopGracePeriodSeconds) (.Values.spool.mountPath | squote) $drain | quote }}
{{- end -}}

{{/*
The node drainer (spool.drainer): a native sidecar, an init container with restartPolicy Always, after the spool's
own init container. It starts before the Ray container and is stopped only after it, so it outlives the preStop
hook, whose `hfi metering drain` waits for it to deliver this pod's files. While it runs it holds the spool
directory's drainer lock: the serving processes only append to their spool files and leave the ledger writes to it.
At its SIGTERM (the Ray container gone) it delivers what is left for 10 s: the preStop hook ends at the latest 15 s
before the grace period does, and the rest waits in the spool (for another pod's drainer on the same volume, or the
next one here). Kubernetes >= 1.29.
*/}}
{{- define "hfi.spoolDrainer" -}}
- name: spool-drainer
  image: {{ include "hfi.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  restartPolicy: Always
  command: ["hfi", "metering", "drain", "--follow", "--timeout-s", "10"]
  env:
    {{- include "hfi.env" . | trim | nindent 4 }}
  {{- with .Values.spool.drainer.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - {name: spool, mountPath: {{ .Values.spool.mountPath | quote }}}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
