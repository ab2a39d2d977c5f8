{{/*
The chart's name, truncated to 63 characters (a DNS label).
*/}}
{{- define "tpfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: the release name alone when it already holds the chart's name, else
<release>-<chart>; 63 characters at most. Components append -etcd, -coordinator, -workers to it, so it is
cut to 50 to leave room.
*/}}
{{- define "tpfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, the helm.sh/chart label.
*/}}
{{- define "tpfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The standard labels of every object.
*/}}
{{- define "tpfleet.labels" -}}
helm.sh/chart: {{ include "tpfleet.chart" . }}
{{ include "tpfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tpfleet
{{- end }}

{{/*
Selector labels: only the never-changing name and instance. Components add app.kubernetes.io/component.
*/}}
{{- define "tpfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tpfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The service account the pods run as.
*/}}
{{- define "tpfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tpfleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The tpfleet image: repository:tag, the tag defaulting to the chart's appVersion (never "latest").
*/}}
{{- define "tpfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The etcd client endpoints the coordinators and workers use: the in-chart etcd's members through its
headless Service, or etcd.external.endpoints.
*/}}
{{- define "tpfleet.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $fullname := include "tpfleet.fullname" . }}
{{- $eps := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $eps = append $eps (printf "http://%s-etcd-%d.%s-etcd:%d" $fullname $i $fullname (int $.Values.etcd.clientPort)) }}
{{- end }}
{{- join "," $eps }}
{{- else }}
{{- required "etcd.external.endpoints is required when etcd.enabled is false" .Values.etcd.external.endpoints | join "," }}
{{- end }}
{{- end }}

{{/*
The checkpoint directory inside the containers.
*/}}
{{- define "tpfleet.modelPath" -}}
{{- $path := required "model.path is required: the checkpoint directory (in the model volume, or absolute in the image)" .Values.model.path }}
{{- if eq .Values.model.source "image" }}
{{- $path }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" $path) | trimSuffix "/" }}
{{- end }}
{{- end }}

{{/*
The model volume (none for model.source image).
*/}}
{{- define "tpfleet.modelVolumes" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model" (include "tpfleet.fullname" .)) $m.pvc.existingClaim }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required for model.source hostPath" $m.hostPath.path }}
    type: Directory
{{- else if eq $m.source "initCopy" }}
- name: model
  emptyDir:
    {{- with $m.initCopy.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
- name: model-source
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model" (include "tpfleet.fullname" .)) $m.pvc.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{/*
The model volume's mount in the tpfleet containers.
*/}}
{{- define "tpfleet.modelMounts" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: {{ ne .Values.model.source "initCopy" }}
{{- end }}
{{- end }}

{{/*
The init container that copies the checkpoint from the PVC to the pod's own volume (model.source initCopy).
*/}}
{{- define "tpfleet.modelInitContainers" -}}
{{- if eq .Values.model.source "initCopy" }}
- name: copy-model
  image: {{ .Values.model.initCopy.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["sh", "-c"]
  args:
    - cp -a "/model-source/{{ trimPrefix "/" .Values.model.path }}/." "{{ include "tpfleet.modelPath" . }}/"
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
    - name: model-source
      mountPath: /model-source
      readOnly: true
{{- end }}
{{- end }}

{{/*
Environment every tpfleet container gets: its pod's name and IP (advertised addresses, member IDs), the
library directories, and the user's env.
*/}}
{{- define "tpfleet.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- if .Values.gpuLibraries.hostPath }}
- name: TPFLEET_LIB_DIRS
  value: /opt/tpfleet/lib
{{- end }}
{{- if .Values.tls.enabled }}
- name: TPFLEET_TLS_CERT
  value: /etc/tpfleet/tls/tls.crt
- name: TPFLEET_TLS_KEY
  value: /etc/tpfleet/tls/tls.key
- name: TPFLEET_TLS_CA
  value: /etc/tpfleet/tls/ca.crt
{{- else }}
- name: TPFLEET_INSECURE
  value: "1"
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The TLS secret's volume and mount at /etc/tpfleet/tls (tls.enabled); tpfleet.env points TPFLEET_TLS_* at
its files, or sets TPFLEET_INSECURE without it (the pods listen on 0.0.0.0).
*/}}
{{- define "tpfleet.tlsVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled" .Values.tls.secretName }}
{{- end }}
{{- end }}

{{- define "tpfleet.tlsMounts" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/tpfleet/tls
  readOnly: true
{{- end }}
{{- end }}
