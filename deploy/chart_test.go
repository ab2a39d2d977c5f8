package deploy_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// serviceMonitor is the part of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) the
// chart renders; it is not among the k8s.io/api types, so it is declared here, as strictly.
type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector  metav1.LabelSelector `json:"selector"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path"`
			Interval      string `json:"interval"`
			ScrapeTimeout string `json:"scrapeTimeout"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// manifests are the objects of one rendering, decoded.
type manifests struct {
	services     map[string]*corev1.Service
	deployments  map[string]*appsv1.Deployment
	statefulSets map[string]*appsv1.StatefulSet
	other        []string // kind/name of the rest
}

// decodeStrict decodes every document into its k8s.io/api type (by apiVersion and kind), failing on an
// unknown field or kind, and checks what the API server would refuse early: names are DNS labels or
// subdomains, and every workload's selector matches its pod template.
func decodeStrict(t *testing.T, docs [][]byte) manifests {
	t.Helper()
	m := manifests{services: map[string]*corev1.Service{}, deployments: map[string]*appsv1.Deployment{}, statefulSets: map[string]*appsv1.StatefulSet{}}
	for _, doc := range docs {
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			t.Fatalf("document is not YAML: %v\n%s", err, doc)
		}
		var obj interface{ GetName() string }
		switch tm.APIVersion + "/" + tm.Kind {
		case "v1/Service":
			obj = &corev1.Service{}
		case "v1/ServiceAccount":
			obj = &corev1.ServiceAccount{}
		case "v1/PersistentVolumeClaim":
			obj = &corev1.PersistentVolumeClaim{}
		case "apps/v1/Deployment":
			obj = &appsv1.Deployment{}
		case "apps/v1/StatefulSet":
			obj = &appsv1.StatefulSet{}
		case "policy/v1/PodDisruptionBudget":
			obj = &policyv1.PodDisruptionBudget{}
		case "networking.k8s.io/v1/NetworkPolicy":
			obj = &networkingv1.NetworkPolicy{}
		case "monitoring.coreos.com/v1/ServiceMonitor":
			obj = &serviceMonitor{}
		default:
			t.Fatalf("rendered an object of unexpected kind %s %s", tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			t.Fatalf("%s does not decode strictly into its API type: %v\n%s", tm.Kind, err, doc)
		}
		name := obj.GetName()
		if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
			t.Errorf("%s %q: %v", tm.Kind, name, errs)
		}
		switch o := obj.(type) {
		case *corev1.Service:
			if errs := validation.IsDNS1035Label(name); len(errs) > 0 {
				t.Errorf("Service %q: %v", name, errs)
			}
			m.services[name] = o
		case *appsv1.Deployment:
			checkPodTemplate(t, "Deployment "+name, o.Spec.Selector, o.Spec.Template)
			m.deployments[name] = o
		case *appsv1.StatefulSet:
			checkPodTemplate(t, "StatefulSet "+name, o.Spec.Selector, o.Spec.Template, o.Spec.VolumeClaimTemplates...)
			if _, ok := m.services[o.Spec.ServiceName]; !ok { // helm renders Services before workloads
				t.Errorf("StatefulSet %s: serviceName %q is not rendered", name, o.Spec.ServiceName)
			}
			m.statefulSets[name] = o
		default:
			m.other = append(m.other, tm.Kind+"/"+name)
		}
	}
	return m
}

// checkPodTemplate checks that the selector matches the template's labels, that every container runs as
// non-root with a read-only root file system, and that named probe ports exist.
// claims are a StatefulSet's volume claim templates, volumes too.
func checkPodTemplate(t *testing.T, what string, sel *metav1.LabelSelector, tpl corev1.PodTemplateSpec, claims ...corev1.PersistentVolumeClaim) {
	t.Helper()
	for k, v := range sel.MatchLabels {
		if tpl.Labels[k] != v {
			t.Errorf("%s: selector %s=%s does not match the pod template's labels %v", what, k, v, tpl.Labels)
		}
	}
	if sc := tpl.Spec.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("%s: pods may run as root", what)
	}
	for _, c := range append(slices.Clone(tpl.Spec.InitContainers), tpl.Spec.Containers...) {
		if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: container %s has a writable root file system", what, c.Name)
		}
		if strings.HasSuffix(c.Image, ":latest") || !strings.Contains(c.Image, ":") {
			t.Errorf("%s: container %s image %q has no pinned tag", what, c.Name, c.Image)
		}
		ports := map[string]bool{}
		for _, p := range c.Ports {
			ports[p.Name] = true
			if errs := validation.IsValidPortName(p.Name); len(errs) > 0 {
				t.Errorf("%s: container %s port name %q: %v", what, c.Name, p.Name, errs)
			}
		}
		for _, p := range []*corev1.Probe{c.StartupProbe, c.ReadinessProbe, c.LivenessProbe} {
			if p != nil && p.TCPSocket != nil && p.TCPSocket.Port.StrVal != "" && !ports[p.TCPSocket.Port.StrVal] {
				t.Errorf("%s: container %s probes port %q, which it does not name", what, c.Name, p.TCPSocket.Port.StrVal)
			}
		}
		volumes := map[string]bool{}
		for _, v := range tpl.Spec.Volumes {
			volumes[v.Name] = true
		}
		for _, c := range claims {
			volumes[c.Name] = true
		}
		for _, vm := range c.VolumeMounts {
			if !volumes[vm.Name] {
				t.Errorf("%s: container %s mounts volume %q, which the pod does not have", what, c.Name, vm.Name)
			}
		}
	}
}

// TestChartLint: helm lint --strict passes for every example value set.
func TestChartLint(t *testing.T) {
	for _, set := range valueSets {
		out, stderr, err := runHelm(t, "lint", "--strict", chartDir, "-f", exampleFile(set))
		if err != nil {
			t.Errorf("helm lint --strict -f %s: %v\n%s%s", set, err, out, stderr)
		}
	}
}

// container returns the named container of a pod template.
func container(t *testing.T, tpl corev1.PodTemplateSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range tpl.Spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

// arg returns the value of --name=value in args, or "" when absent.
func arg(args []string, name string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

// TestChartRender: helm template renders every example value set into objects that decode strictly
// into the k8s.io/api types, with the shape each set asks for: workers (one GPU each), TP size, etcd
// members, placement; and the optional objects (ServiceMonitor, NetworkPolicy, PDBs, the model PVC, the
// TLS mount) render and decode too.
func TestChartRender(t *testing.T) {
	tests := []struct {
		set          string
		workers      int32
		tp           string
		gpu          bool
		etcdReplicas int32
		coordinators int32
		spread       bool
	}{
		{"1node-8gpu-tp8", 8, "8", true, 1, 2, false},
		{"2node-8gpu-tp8-2replicas", 16, "8", true, 3, 2, false},
		{"2node-4gpu-tp8", 8, "8", true, 1, 2, true},
		{"cpu-demo", 1, "1", false, 1, 1, false},
	}
	for _, tt := range tests {
		t.Run(tt.set, func(t *testing.T) {
			m := decodeStrict(t, render(t, []string{exampleFile(tt.set)}))
			w, ok := m.statefulSets["tpf-tpfleet-workers"]
			if !ok {
				t.Fatalf("no workers StatefulSet; have %v", m.statefulSets)
			}
			if *w.Spec.Replicas != tt.workers {
				t.Errorf("workers replicas = %d, want %d", *w.Spec.Replicas, tt.workers)
			}
			wc := container(t, w.Spec.Template, "worker")
			gpus := wc.Resources.Limits["nvidia.com/gpu"]
			if got := gpus.Value(); (got == 1) != tt.gpu || (!tt.gpu && got != 0) {
				t.Errorf("worker nvidia.com/gpu limit = %d, want 1 when on GPUs (%v)", got, tt.gpu)
			}
			if wc.Args[0] != "worker" || arg(wc.Args, "id") != "$(POD_NAME)" || !strings.HasPrefix(arg(wc.Args, "advertise"), "$(POD_IP):") {
				t.Errorf("worker args = %q, want worker --id=$(POD_NAME) --advertise=$(POD_IP):port", wc.Args)
			}
			if wc.StartupProbe == nil || wc.StartupProbe.GRPC == nil {
				t.Errorf("worker startup probe = %+v, want gRPC health", wc.StartupProbe)
			}
			if !slices.ContainsFunc(wc.VolumeMounts, func(v corev1.VolumeMount) bool { return v.MountPath == "/dev/shm" }) {
				t.Errorf("worker mounts no /dev/shm")
			}
			checkKernelCache(t, w.Spec.Template, wc, "/var/cache/tpfleet/kernels")
			if spread := len(w.Spec.Template.Spec.TopologySpreadConstraints) > 0; spread != tt.spread {
				t.Errorf("workers spread over nodes = %v, want %v", spread, tt.spread)
			}
			c, ok := m.deployments["tpf-tpfleet-coordinator"]
			if !ok {
				t.Fatalf("no coordinator Deployment; have %v", m.deployments)
			}
			cc := container(t, c.Spec.Template, "coordinator")
			if *c.Spec.Replicas != tt.coordinators || arg(cc.Args, "tp") != tt.tp || arg(cc.Args, "model") == "" || arg(cc.Args, "model") != arg(wc.Args, "model") {
				t.Errorf("coordinator replicas %d args %q, want %d, --tp=%s and the workers' --model", *c.Spec.Replicas, cc.Args, tt.coordinators, tt.tp)
			}
			e, ok := m.statefulSets["tpf-tpfleet-etcd"]
			if !ok || *e.Spec.Replicas != tt.etcdReplicas {
				t.Fatalf("etcd StatefulSet = %v, want %d members", ok, tt.etcdReplicas)
			}
			eps := strings.Split(arg(cc.Args, "etcd"), ",")
			if len(eps) != int(tt.etcdReplicas) || arg(wc.Args, "etcd") != arg(cc.Args, "etcd") {
				t.Errorf("--etcd = %v (workers %q), want %d endpoints, the same on both", eps, arg(wc.Args, "etcd"), tt.etcdReplicas)
			}
			svc, ok := m.services["tpf-tpfleet"]
			if !ok || svc.Spec.Selector["app.kubernetes.io/component"] != "coordinator" {
				t.Errorf("API Service = %+v, want one selecting the coordinators", svc)
			}
		})
	}

	t.Run("optional objects", func(t *testing.T) {
		m := decodeStrict(t, render(t, []string{exampleFile("1node-8gpu-tp8")},
			"metrics.serviceMonitor.enabled=true", "networkPolicy.enabled=true", "podDisruptionBudget.enabled=true",
			"tls.enabled=true", "tls.secretName=tpfleet-tls", "model.pvc.create=true", "model.pvc.existingClaim=",
			"workers.placement=spread", "etcd.replicas=3", "coordinator.extraArgs={--shutdown-grace=10s}"))
		want := []string{"NetworkPolicy/tpf-tpfleet", "PersistentVolumeClaim/tpf-tpfleet-model", "PodDisruptionBudget/tpf-tpfleet-coordinator",
			"PodDisruptionBudget/tpf-tpfleet-worker", "ServiceAccount/tpf-tpfleet", "ServiceMonitor/tpf-tpfleet"}
		slices.Sort(m.other)
		if !slices.Equal(m.other, want) {
			t.Errorf("other objects = %v, want %v", m.other, want)
		}
		cc := container(t, m.deployments["tpf-tpfleet-coordinator"].Spec.Template, "coordinator")
		if !slices.Contains(cc.Args, "--shutdown-grace=10s") || !slices.ContainsFunc(cc.VolumeMounts, func(v corev1.VolumeMount) bool { return v.MountPath == "/etc/tpfleet/tls" }) {
			t.Errorf("coordinator args %q mounts %+v; want the extra arg and the TLS mount", cc.Args, cc.VolumeMounts)
		}
		// With TLS the processes find the secret's files through TPFLEET_TLS_* and do not run --insecure.
		env := map[string]string{}
		for _, e := range cc.Env {
			env[e.Name] = e.Value
		}
		if env["TPFLEET_TLS_CERT"] != "/etc/tpfleet/tls/tls.crt" || env["TPFLEET_TLS_CA"] != "/etc/tpfleet/tls/ca.crt" || env["TPFLEET_INSECURE"] != "" {
			t.Errorf("coordinator env with tls.enabled = %v; want TPFLEET_TLS_* on the mounted secret and no TPFLEET_INSECURE", env)
		}
	})

	t.Run("hostPath model, external etcd", func(t *testing.T) {
		m := decodeStrict(t, render(t, []string{exampleFile("1node-8gpu-tp8")},
			"model.source=hostPath", "model.hostPath.path=/data/models", "etcd.enabled=false", "etcd.external.endpoints={http://etcd.infra:2379}"))
		if _, ok := m.statefulSets["tpf-tpfleet-etcd"]; ok {
			t.Error("etcd StatefulSet rendered with etcd.enabled=false")
		}
		wc := container(t, m.statefulSets["tpf-tpfleet-workers"].Spec.Template, "worker")
		if arg(wc.Args, "etcd") != "http://etcd.infra:2379" || arg(wc.Args, "model") != "/models/Llama-4-Scout-17B-16E-Instruct" {
			t.Errorf("worker args = %q, want the external etcd and the model under /models", wc.Args)
		}
	})
}

// TestChartSchema: values.schema.json rejects bad values at helm template (and install) time, with a
// message that names the field.
func TestChartSchema(t *testing.T) {
	tests := []struct {
		name, values string
		want         []string // all in the error
	}{
		{"tp below 1", "serving:\n  tp: 0\n", []string{"/serving/tp", "minimum"}},
		{"misspelt key", "workers:\n  replica: 8\n", []string{"/workers", "replica"}},
		{"two etcd members", "etcd:\n  replicas: 2\n", []string{"/etcd/replicas"}},
		{"unknown device", "workers:\n  device: tpu\n", []string{"/workers/device"}},
		{"latest tag", "image:\n  tag: latest\n", []string{"/image/tag"}},
		{"bad quantization", "serving:\n  quantization: fp4\n", []string{"/serving/quantization"}},
		{"port out of range", "coordinator:\n  httpPort: 80000\n", []string{"/coordinator/httpPort"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := filepath.Join(t.TempDir(), "bad.yaml")
			if err := os.WriteFile(bad, []byte(tt.values), 0o644); err != nil {
				t.Fatal(err)
			}
			_, stderr, err := runHelm(t, "template", "tpf", chartDir, "-f", exampleFile("cpu-demo"), "-f", bad)
			if err == nil || !exitErr(err) {
				t.Fatalf("helm template with %q = %v, want a schema error", tt.values, err)
			}
			for _, w := range tt.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("helm template with %q: error %q does not name %q", tt.values, strings.TrimSpace(stderr), w)
				}
			}
		})
	}
	// The example value sets themselves pass the schema (helm template above would fail otherwise), and
	// so do the chart's defaults with a model path.
	if _, stderr, err := runHelm(t, "template", "tpf", chartDir, "--set", "model.path=m"); err != nil {
		t.Errorf("helm template with the defaults: %v\n%s", err, stderr)
	}
}

// checkKernelCache checks that the worker container points TPFLEET_KERNEL_CACHE at a mounted volume.
func checkKernelCache(t *testing.T, tpl corev1.PodTemplateSpec, c corev1.Container, path string) {
	t.Helper()
	i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "TPFLEET_KERNEL_CACHE" })
	if i < 0 || c.Env[i].Value != path {
		t.Errorf("%s container: TPFLEET_KERNEL_CACHE not %s (env %v)", c.Name, path, c.Env)
	}
	m := slices.IndexFunc(c.VolumeMounts, func(v corev1.VolumeMount) bool { return v.MountPath == path })
	if m < 0 {
		t.Fatalf("%s container mounts nothing at the kernel cache %s", c.Name, path)
	}
	if !slices.ContainsFunc(tpl.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == c.VolumeMounts[m].Name }) {
		t.Errorf("the kernel cache's volume %s is not in the pod", c.VolumeMounts[m].Name)
	}
}

// TestChartKernelCache: the kernel cache is an emptyDir by default, a claim when one is named, and with
// warmup an init container fills it on the pod's GPU first.
func TestChartKernelCache(t *testing.T) {
	m := decodeStrict(t, render(t, []string{exampleFile("1node-8gpu-tp8")}, "workers.kernelCache.existingClaim=kernels",
		"workers.kernelCache.warmup=true", "workers.kernelCache.path=/cache"))
	w := m.statefulSets["tpf-tpfleet-workers"]
	checkKernelCache(t, w.Spec.Template, container(t, w.Spec.Template, "worker"), "/cache")
	vi := slices.IndexFunc(w.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == "kernel-cache" })
	if vi < 0 || w.Spec.Template.Spec.Volumes[vi].PersistentVolumeClaim == nil || w.Spec.Template.Spec.Volumes[vi].PersistentVolumeClaim.ClaimName != "kernels" {
		t.Errorf("kernel-cache volume = %+v, want the claim kernels", w.Spec.Template.Spec.Volumes)
	}
	ii := slices.IndexFunc(w.Spec.Template.Spec.InitContainers, func(c corev1.Container) bool { return c.Name == "kernel-warmup" })
	if ii < 0 {
		t.Fatalf("no kernel-warmup init container: %v", w.Spec.Template.Spec.InitContainers)
	}
	init := w.Spec.Template.Spec.InitContainers[ii]
	if init.Args[0] != "warmup" || arg(init.Args, "kernel-cache") != "/cache" || init.Resources.Limits.Name("nvidia.com/gpu", "").Value() != 1 {
		t.Errorf("kernel-warmup = %q, limits %v; want warmup --kernel-cache=/cache on the pod's GPU", init.Args, init.Resources.Limits)
	}
	cpu := decodeStrict(t, render(t, []string{exampleFile("cpu-demo")}, "workers.kernelCache.warmup=true"))
	if cw := cpu.statefulSets["tpf-tpfleet-workers"]; slices.ContainsFunc(cw.Spec.Template.Spec.InitContainers, func(c corev1.Container) bool { return c.Name == "kernel-warmup" }) {
		t.Errorf("a cpu worker has a kernel-warmup init container")
	}
}
