{{/*
Names, labels, and what several templates share: the worker addresses the
router dials, the placement file, the cross-field checks.
*/}}

{{/* The chart's name, cut like the fullname. */}}
{{- define "tramontane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/*
RELEASE-tramontane, or the release name when it already holds the chart's
name. 40 characters at most: "-workers" and a pod index or the StatefulSet's
revision hash must still fit the 63 of a label value or DNS label.
*/}}
{{- define "tramontane.fullname" -}}
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

{{- define "tramontane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The StatefulSet of the workers, and its headless Service. */}}
{{- define "tramontane.workersName" -}}
{{- printf "%s-workers" (include "tramontane.fullname" .) -}}
{{- end -}}

{{/* Selector labels; call with (dict "ctx" $ "component" "router"). */}}
{{- define "tramontane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tramontane.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels; call with (dict "ctx" $ "component" "router"). */}}
{{- define "tramontane.labels" -}}
{{ include "tramontane.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "tramontane.chart" .ctx }}
{{- end -}}

{{- define "tramontane.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The pod spec's imagePullSecrets (names or {name: ...}); empty without any. */}}
{{- define "tramontane.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets -}}
imagePullSecrets:
{{- range . }}
  - name: {{ if kindIs "string" . }}{{ . }}{{ else }}{{ .name }}{{ end }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
The workers' stable addresses, in index order, comma-separated:
<fullname>-workers-<i>.<fullname>-workers.<namespace>.svc.<domain>:<port>.
*/}}
{{- define "tramontane.workerAddresses" -}}
{{- $workers := include "tramontane.workersName" . -}}
{{- $addresses := list -}}
{{- range $i := until (int .Values.workers.replicas) -}}
{{- $addresses = append $addresses (printf "%s-%d.%s.%s.svc.%s:%d" $workers $i $workers $.Release.Namespace $.Values.clusterDomain (int $.Values.workers.port)) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{/*
The placement file: `placement` as given, else expert e of every routed
layer on worker e mod workers.replicas (a dense layer's row empty).
*/}}
{{- define "tramontane.placement" -}}
{{- if .Values.placement -}}
{{- toJson .Values.placement -}}
{{- else -}}
{{- $workers := int .Values.workers.replicas -}}
{{- $layers := list -}}
{{- range $layer := until (int .Values.model.numLayers) -}}
{{- $experts := list -}}
{{- range $expert := until (include "tramontane.layerExperts" (list $ $layer) | int) -}}
{{- $experts = append $experts (list (mod $expert $workers)) -}}
{{- end -}}
{{- $layers = append $layers $experts -}}
{{- end -}}
{{- toJson (dict "workers" $workers "experts" $layers) -}}
{{- end -}}
{{- end -}}

{{/*
The routed experts of layer (index 1 of the list; index 0 the root
context): none in a layer of model.denseLayers, else model.numExperts.
*/}}
{{- define "tramontane.layerExperts" -}}
{{- $root := index . 0 -}}
{{- $layer := index . 1 -}}
{{- $experts := int $root.Values.model.numExperts -}}
{{- range ($root.Values.model.denseLayers | default list) -}}
{{- if eq (int .) (int $layer) -}}
{{- $experts = 0 -}}
{{- end -}}
{{- end -}}
{{- $experts -}}
{{- end -}}

{{/*
What the schema cannot say: checks across values, each failing with the
value to change.
*/}}
{{- define "tramontane.validate" -}}
{{- $replicas := int .Values.workers.replicas -}}
{{- with .Values.model.fill -}}
{{- if .enabled -}}
{{- if not (has $.Values.model.volume.type (list "pvc" "emptyDir")) -}}
{{- fail (printf "model.fill writes the model volume: model.volume.type must be pvc (ReadWriteMany) or emptyDir, not %s" $.Values.model.volume.type) -}}
{{- end -}}
{{- if and (eq .from "s3") (or (not .s3.url) (not .s3.secret)) -}}
{{- fail "model.fill.from s3 needs model.fill.s3.url (s3://BUCKET/PATH) and model.fill.s3.secret" -}}
{{- end -}}
{{- if and (eq .from "pvc") (not .pvc.claimName) -}}
{{- fail "model.fill.from pvc needs model.fill.pvc.claimName" -}}
{{- end -}}
{{- if and (eq .from "image") (not .image.reference) -}}
{{- fail "model.fill.from image needs model.fill.image.reference" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) -}}
{{- fail "ingress.enabled needs ingress.hosts: the host names to serve" -}}
{{- end -}}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) -}}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs: the Gateways to attach to" -}}
{{- end -}}
{{- with .Values.router.autoscaling -}}
{{- if and .enabled (lt (int .maxReplicas) (int .minReplicas)) -}}
{{- fail (printf "router.autoscaling.maxReplicas (%d) is below router.autoscaling.minReplicas (%d)" (int .maxReplicas) (int .minReplicas)) -}}
{{- end -}}
{{- end -}}
{{- with .Values.placement -}}
{{- if ne (int .workers) $replicas -}}
{{- fail (printf "placement.workers is %d but workers.replicas is %d: the placement must be for the workers the chart runs" (int .workers) $replicas) -}}
{{- end -}}
{{- if ne (len .experts) (int $.Values.model.numLayers) -}}
{{- fail (printf "placement.experts has %d layers but model.numLayers is %d" (len .experts) (int $.Values.model.numLayers)) -}}
{{- end -}}
{{- range $layer, $experts := .experts -}}
{{- $expected := include "tramontane.layerExperts" (list $ $layer) | int -}}
{{- if ne (len $experts) $expected -}}
{{- fail (printf "placement.experts[%d] has %d experts but the model's layer %d has %d (model.numExperts, none in model.denseLayers)" $layer (len $experts) $layer $expected) -}}
{{- end -}}
{{- range $expert, $holders := $experts -}}
{{- range $holders -}}
{{- if ge (int .) $replicas -}}
{{- fail (printf "placement.experts[%d][%d] names worker %d, but there are workers 0 to %d (workers.replicas)" $layer $expert (int .) (sub $replicas 1)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.apiKey.enabled (not .Values.apiKey.existingSecret) (not .Values.apiKey.value) -}}
{{- fail "apiKey.enabled needs apiKey.value (the chart makes the Secret) or apiKey.existingSecret" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.enabled needs tls.existingSecret: a Secret with ca.pem, router.pem, router-key.pem, worker.pem and worker-key.pem (see `tramontane certs`)" -}}
{{- end -}}
{{- $volume := .Values.model.volume -}}
{{- if and (eq $volume.type "pvc") (not $volume.claimName) -}}
{{- fail "model.volume.type pvc needs model.volume.claimName" -}}
{{- end -}}
{{- if and (eq $volume.type "hostPath") (not $volume.hostPath) -}}
{{- fail "model.volume.type hostPath needs model.volume.hostPath" -}}
{{- end -}}
{{- if and (eq $volume.type "image") (not $volume.image.reference) -}}
{{- fail "model.volume.type image needs model.volume.image.reference" -}}
{{- end -}}
{{- $ports := .Values.router.ports -}}
{{- if or (eq (int $ports.grpc) (int $ports.http)) (eq (int $ports.grpc) (int $ports.metrics)) (eq (int $ports.http) (int $ports.metrics)) -}}
{{- fail (printf "router.ports grpc (%d), http (%d) and metrics (%d) must differ" (int $ports.grpc) (int $ports.http) (int $ports.metrics)) -}}
{{- end -}}
{{- end -}}

{{/* The model volume, read-only in every pod. */}}
{{- define "tramontane.modelVolume" -}}
- name: model
{{- $volume := .Values.model.volume }}
{{- if eq $volume.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $volume.claimName }}
    readOnly: {{ not .Values.model.fill.enabled }}
{{- else if eq $volume.type "hostPath" }}
  hostPath:
    path: {{ $volume.hostPath }}
    type: Directory
{{- else if eq $volume.type "emptyDir" }}
  emptyDir:
    {{- with $volume.emptyDirSizeLimit }}
    sizeLimit: {{ . }}
    {{- else }}
    {}
    {{- end }}
{{- else }}
  image:
    reference: {{ $volume.image.reference }}
    pullPolicy: {{ $volume.image.pullPolicy }}
{{- end }}
{{- end -}}

{{/*
/etc/tramontane: placement.json, and the TLS files (tls/) and API keys
(api-key/) when used, as one projected volume: a Secret mounted inside a
ConfigMap's read-only mount would need a mount point made in it.
Call with (dict "ctx" $ "tls" (list "ca.pem" ...) "apiKey" true).
*/}}
{{- define "tramontane.configVolume" -}}
{{- $ctx := .ctx -}}
- name: config
  projected:
    sources:
      - configMap:
          name: {{ include "tramontane.fullname" $ctx }}-placement
          items:
            - key: placement.json
              path: placement.json
{{- if $ctx.Values.tls.enabled }}
      - secret:
          name: {{ $ctx.Values.tls.existingSecret }}
          items:
{{- range .tls }}
            - key: {{ . }}
              path: tls/{{ . }}
{{- end }}
{{- end }}
{{- if and .apiKey $ctx.Values.apiKey.enabled }}
      - secret:
          name: {{ include "tramontane.apiKeySecret" $ctx }}
          items:
            - key: {{ $ctx.Values.apiKey.key }}
              path: api-key/{{ $ctx.Values.apiKey.key }}
{{- end }}
{{- end -}}

{{/* The admin key's Secret, and the router's admin Service and URL. */}}
{{- define "tramontane.adminKeySecret" -}}
{{- default (printf "%s-admin-key" (include "tramontane.fullname" .)) .Values.router.admin.existingSecret -}}
{{- end -}}

{{- define "tramontane.adminName" -}}
{{- printf "%s-admin" (include "tramontane.fullname" .) -}}
{{- end -}}

{{- define "tramontane.adminUrl" -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.tls.enabled) (include "tramontane.adminName" .) .Release.Namespace (int .Values.router.admin.port) -}}
{{- end -}}

{{- define "tramontane.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "tramontane.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{/* A startup probe's failureThreshold for a budget in seconds, probing every 10 s. */}}
{{- define "tramontane.startupFailures" -}}
{{- max 1 (div (add (int .) 9) 10) -}}
{{- end -}}

{{/* The pods' ServiceAccount name; empty for the namespace's default. */}}
{{- define "tramontane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tramontane.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A pod spec's account and scheduling fields from a component's values
(dict "ctx" $ "values" $router "component" "router"): a topology spread
constraint without a labelSelector gets the component's pods'. */}}
{{- define "tramontane.podScheduling" -}}
{{- $v := .values -}}
{{- with include "tramontane.serviceAccountName" .ctx }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: {{ .ctx.Values.serviceAccount.automountToken }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $v.runtimeClassName }}
runtimeClassName: {{ . | quote }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range . }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $selector := include "tramontane.selectorLabels" (dict "ctx" $.ctx "component" $.component) | fromYaml }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
  - {{- toYaml $constraint | nindent 4 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Non-empty when the router may run more than one replica. */}}
{{- define "tramontane.routerReplicated" -}}
{{- $router := .Values.router -}}
{{- if or (gt (int $router.replicas) 1) (and $router.autoscaling.enabled (gt (int $router.autoscaling.maxReplicas) 1)) -}}
true
{{- end -}}
{{- end -}}

{{/* The model fill's init container and its source volume (model.fill),
as a pod's `initContainers` entry and `volumes` entries; empty without it. */}}
{{- define "tramontane.modelFillContainer" -}}
{{- $fill := .Values.model.fill -}}
{{- if $fill.enabled }}
- name: model-fill
  image: {{ printf "%s:%s" $fill.copier.repository $fill.copier.tag }}
  imagePullPolicy: {{ $fill.copier.pullPolicy }}
  command:
    - sh
    - -c
    - |
      set -e
      target={{ .Values.model.path | quote }}
      if [ -f "$target/.tramontane-filled" ]; then
        echo "the checkpoint is in $target already"
        exit 0
      fi
      {{- if eq $fill.from "s3" }}
      rclone copy --fast-list --transfers 8 ":s3:{{ trimPrefix "s3://" $fill.s3.url }}" "$target"
      {{- else }}
      cp -R /source/{{ $fill.from | eq "pvc" | ternary $fill.pvc.subPath $fill.image.subPath }}/. "$target"/
      {{- end }}
      touch "$target/.tramontane-filled"
  {{- if eq $fill.from "s3" }}
  env:
    - name: RCLONE_S3_PROVIDER
      value: {{ $fill.s3.endpoint | empty | ternary "AWS" "Other" }}
    {{- with $fill.s3.endpoint }}
    - name: RCLONE_S3_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- with $fill.s3.region }}
    - name: RCLONE_S3_REGION
      value: {{ . | quote }}
    {{- end }}
    - name: RCLONE_S3_ACCESS_KEY_ID
      valueFrom:
        secretKeyRef:
          name: {{ $fill.s3.secret }}
          key: AWS_ACCESS_KEY_ID
    - name: RCLONE_S3_SECRET_ACCESS_KEY
      valueFrom:
        secretKeyRef:
          name: {{ $fill.s3.secret }}
          key: AWS_SECRET_ACCESS_KEY
    - name: RCLONE_CONFIG
      value: /tmp/rclone.conf
  {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $fill.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.path }}
    {{- if ne $fill.from "s3" }}
    - name: model-source
      mountPath: /source
      readOnly: true
    {{- end }}
{{- end }}
{{- end -}}

{{- define "tramontane.modelFillVolume" -}}
{{- $fill := .Values.model.fill -}}
{{- if and $fill.enabled (ne $fill.from "s3") }}
- name: model-source
  {{- if eq $fill.from "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $fill.pvc.claimName }}
    readOnly: true
  {{- else }}
  image:
    reference: {{ $fill.image.reference }}
    pullPolicy: {{ $fill.image.pullPolicy }}
  {{- end }}
{{- end }}
{{- end -}}
