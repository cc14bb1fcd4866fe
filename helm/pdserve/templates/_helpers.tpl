{{/* ------------------------------------------------------------------ names and labels */}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-pdserve, or the release name alone when it already contains the chart name. */}}
{{- define "pdserve.fullname" -}}
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

{{/* A component's resource name: <fullname>-<suffix>, kept under 63 characters. */}}
{{- define "pdserve.componentName" -}}
{{- printf "%s-%s" (include "pdserve.fullname" .ctx | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component }}
{{- end }}

{{- define "pdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "pdserve.selectorLabels" (dict "ctx" $ "component" "router") */}}
{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pdserve.labels" -}}
{{ include "pdserve.selectorLabels" . }}
helm.sh/chart: {{ include "pdserve.chart" .ctx }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels every pod of this release carries (NetworkPolicy peers select on them). */}}
{{- define "pdserve.releaseSelector" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pdserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------------ image and runtime */}}

{{- define "pdserve.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = ternary (printf "%s-cpu" .Chart.AppVersion) .Chart.AppVersion (eq .Values.workers.device "cpu") }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "pdserve.isCPU" -}}
{{- if eq .Values.workers.device "cpu" }}true{{ end }}
{{- end }}

{{- define "pdserve.kvBackend" -}}
{{- .Values.workers.kvBackend | default (ternary "gloo" "nccl" (eq .Values.workers.device "cpu")) }}
{{- end }}

{{- define "pdserve.numWorkers" -}}
{{- $r := .Values.workers.roles }}
{{- add (int $r.prefill) (int $r.decode) (int $r.mixed) }}
{{- end }}

{{- define "pdserve.podSecurityContext" -}}
{{- toYaml (merge (deepCopy (.override | default dict)) .ctx.Values.podSecurityContext) }}
{{- end }}

{{- define "pdserve.containerSecurityContext" -}}
{{- toYaml (merge (deepCopy (.override | default dict)) .ctx.Values.containerSecurityContext) }}
{{- end }}

{{/* Writable scratch: the root filesystem is read-only. HOME and caches point into /tmp. */}}
{{- define "pdserve.scratchEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: TRITON_CACHE_DIR
  value: /tmp/.cache/triton
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{/* ------------------------------------------------------------------ registry (Redis) */}}

{{- define "pdserve.redisName" -}}
{{- include "pdserve.componentName" (dict "ctx" . "component" "redis") }}
{{- end }}

{{/* REGISTRY_URL for `--registry $(REGISTRY_URL)`: the bundled Redis, an external URL, or a Secret. */}}
{{- define "pdserve.registryEnv" -}}
- name: REGISTRY_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://%s:%d/0" (include "pdserve.redisName" .) (int .Values.redis.port) | quote }}
{{- else if .Values.redis.external.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else }}
  value: {{ .Values.redis.external.url | quote }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------------ model */}}

{{/* The --model argument: a preset name, or the model folder inside the mounted volume. */}}
{{- define "pdserve.modelArg" -}}
{{- if eq .Values.model.source "preset" }}
{{- .Values.model.preset }}
{{- else if .Values.model.dir }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimAll "/" .Values.model.dir) }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* The "model" volume (nothing for presets). */}}
{{- define "pdserve.modelVolume" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: {{ $m.hostPath.type }}
{{- else if eq $m.source "url" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.url.sizeLimit }}
{{- end }}
{{- end }}

{{- define "pdserve.modelMount" -}}
{{- if ne .Values.model.source "preset" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The init container that copies the model for source=url.
include "pdserve.fetchModelInit" (dict "ctx" $ "include" (list "*.json" ...)) — no patterns: everything.
*/}}
{{- define "pdserve.fetchModelInit" -}}
{{- $ctx := .ctx }}
{{- $m := $ctx.Values.model }}
{{- if eq $m.source "url" }}
- name: fetch-model
  image: {{ include "pdserve.image" $ctx }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  command: ["python3", "/opt/pdserve/scripts/fetch_model.py"]
  args:
    - --source={{ $m.url.uri }}
    - --dest={{ include "pdserve.modelArg" $ctx }}
    - --strip-components={{ $m.url.stripComponents }}
    {{- range .include }}
    - --include={{ . }}
    {{- end }}
  env:
    {{- include "pdserve.scratchEnv" $ctx | nindent 4 }}
    {{- with $m.url.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $m.url.tokenSecret.key }}
    {{- end }}
  securityContext:
    {{- include "pdserve.containerSecurityContext" (dict "ctx" $ctx) | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $m.mountPath }}
    - name: tmp
      mountPath: /tmp
    - name: scripts
      mountPath: /opt/pdserve/scripts
      readOnly: true
{{- end }}
{{- end }}

{{/* Files the router needs from a model folder: config and tokenizer, never weights. */}}
{{- define "pdserve.tokenizerPatterns" -}}
{{- list "*.json" "*.model" "*.txt" "*.jinja" "*.tiktoken" | toJson }}
{{- end }}

{{/* ------------------------------------------------------------------ workers */}}

{{/*
The worker entrypoint: the StatefulSet ordinal (the pod name's suffix) picks the initial role,
ordinals in order prefill, decode, mixed (workers.roles); ordinals beyond them start as mixed.
The fixed arguments come after the script as "$@", so nothing is re-quoted by the shell.
*/}}
{{- define "pdserve.workerEntrypoint" -}}
{{- $r := .Values.workers.roles -}}
index="${POD_NAME##*-}"
role=mixed
{{- $upto := 0 }}
{{- $first := true }}
{{- range $role := list "prefill" "decode" "mixed" }}
{{- $count := int (get $r $role) }}
{{- if gt $count 0 }}
{{- $upto = add $upto $count }}
{{ if $first }}if{{ else }}elif{{ end }} [ "$index" -lt {{ $upto }} ]; then role={{ $role }}
{{- $first = false }}
{{- end }}
{{- end }}
{{- if not $first }}
fi
{{- end }}
echo "pdserve: worker $POD_NAME (ordinal $index) starts as $role"
exec pdserve worker --role "$role" "$@"
{{- end }}

{{- define "pdserve.workerProbes" -}}
{{- $port := int .Values.workers.grpcPort }}
{{- $defaults := dict
  "startup" (dict "grpc" (dict "port" $port "service" "pdserve.v1.Worker") "periodSeconds" 10 "timeoutSeconds" 5 "failureThreshold" 180)
  "readiness" (dict "grpc" (dict "port" $port "service" "pdserve.v1.Worker") "periodSeconds" 5 "timeoutSeconds" 5 "failureThreshold" 3)
  "liveness" (dict "grpc" (dict "port" $port "service" "") "periodSeconds" 10 "timeoutSeconds" 5 "failureThreshold" 6)
}}
{{- toYaml (merge (deepCopy .Values.workers.probes) $defaults) }}
{{- end }}

{{/*
Router probes. Its health (both "" and pdserve.v1.Generation) is NOT_SERVING while no decode
worker is registered, which is right for readiness (no traffic) but must not restart the router:
startup and liveness check that the gRPC port accepts connections.
*/}}
{{- define "pdserve.routerProbes" -}}
{{- $port := int .Values.router.grpcPort }}
{{- $defaults := dict
  "startup" (dict "tcpSocket" (dict "port" $port) "periodSeconds" 5 "timeoutSeconds" 3 "failureThreshold" 60)
  "readiness" (dict "grpc" (dict "port" $port "service" "pdserve.v1.Generation") "periodSeconds" 5 "timeoutSeconds" 3 "failureThreshold" 2)
  "liveness" (dict "tcpSocket" (dict "port" $port) "periodSeconds" 10 "timeoutSeconds" 3 "failureThreshold" 6)
}}
{{- toYaml (merge (deepCopy .Values.router.probes) $defaults) }}
{{- end }}

{{/* ------------------------------------------------------------------ monitoring */}}

{{/* "true" when ServiceMonitors, the PrometheusRule and the dashboard are rendered. */}}
{{- define "pdserve.monitoring" -}}
{{- $mode := .Values.monitoring.enabled | toString }}
{{- if or (eq $mode "true") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor")) -}}
true
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------------ checks the schema cannot express */}}

{{- define "pdserve.validate" -}}
{{- $r := .Values.workers.roles }}
{{- if lt (int (include "pdserve.numWorkers" .)) 1 }}
{{- fail "workers.roles: at least one worker is needed (prefill + decode + mixed is 0)" }}
{{- end }}
{{- if eq (add (int $r.decode) (int $r.mixed)) 0 }}
{{- fail "workers.roles: a cluster needs a decode or mixed worker to serve (decode + mixed is 0)" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.enabled is false: set redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source is pvc: set model.pvc.claimName" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath.path) }}
{{- fail "model.source is hostPath: set model.hostPath.path" }}
{{- end }}
{{- if and (eq .Values.model.source "url") (not .Values.model.url.uri) }}
{{- fail "model.source is url: set model.url.uri" }}
{{- end }}
{{- if and .Values.apiKey.enabled (not .Values.apiKey.existingSecret) (not .Values.apiKey.keys) }}
{{- fail "apiKey.enabled: set apiKey.existingSecret or apiKey.keys" }}
{{- end }}
{{- if and (eq .Values.workers.device "cpu") (eq (include "pdserve.kvBackend" .) "nccl") }}
{{- fail "workers.kvBackend nccl needs workers.device cuda (use gloo on cpu)" }}
{{- end }}
{{- if and .Values.router.autoscaling.enabled (lt (int .Values.router.autoscaling.maxReplicas) (int .Values.router.autoscaling.minReplicas)) }}
{{- fail "router.autoscaling.maxReplicas must be at least minReplicas" }}
{{- end }}
{{- end }}
