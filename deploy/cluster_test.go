package deploy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// freePorts returns n loopback ports that were free a moment ago.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		_ = l.Close()
	}
	return ports
}

// pod is one rendered pod run as local processes: what a node would run for one replica.
type pod struct {
	name     string
	template corev1.PodTemplateSpec
}

// localEnv maps the cluster onto this machine: every Service name (and a pod's name under a headless
// Service) to 127.0.0.1, 0.0.0.0 binds to loopback, the image's paths to the repository's files, and
// each emptyDir to a temporary directory.
type localEnv struct {
	hosts     *regexp.Regexp    // a host under a rendered Service, followed by its port
	imagePath map[string]string // a path in the image: its local equivalent
	binary    string
	tmp       string
}

func newLocalEnv(t *testing.T, m manifests, binary string) *localEnv {
	names := make([]string, 0, len(m.services))
	for n := range m.services {
		names = append(names, regexp.QuoteMeta(n))
	}
	sort.Slice(names, func(i, j int) bool { return len(names[i]) > len(names[j]) })
	fixtures, err := filepath.Abs(filepath.Join(repoRoot, "testdata", "fixtures"))
	if err != nil {
		t.Fatal(err)
	}
	return &localEnv{
		hosts:     regexp.MustCompile(`(?:[a-z0-9-]+\.)?(?:` + strings.Join(names, "|") + `)(?:\.llm(?:\.svc(?:\.cluster\.local)?)?)?(:\d+)`),
		imagePath: map[string]string{"/opt/tpfleet/fixtures": fixtures},
		binary:    binary,
		tmp:       t.TempDir(),
	}
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// command turns a rendered container of pod p into a local command: Kubernetes' $(VAR) expansion from
// the container's env (fieldRefs to the pod's name and IP), then the host, bind and path mapping.
func (e *localEnv) command(t *testing.T, p pod, c corev1.Container) *exec.Cmd {
	t.Helper()
	if len(c.Command) != 1 || c.Command[0] != "tpfleet" {
		t.Fatalf("pod %s container %s runs %q, want the tpfleet binary", p.name, c.Name, c.Command)
	}
	env := map[string]string{}
	var environ []string
	for _, v := range c.Env {
		val := v.Value
		if f := v.ValueFrom; f != nil {
			switch {
			case f.FieldRef != nil && f.FieldRef.FieldPath == "metadata.name":
				val = p.name
			case f.FieldRef != nil && f.FieldRef.FieldPath == "status.podIP":
				val = "127.0.0.1"
			default:
				t.Fatalf("pod %s container %s: env %s from %+v, which this test does not map", p.name, c.Name, v.Name, f)
			}
		}
		val = e.local(p, c, val, env)
		env[v.Name] = val
		environ = append(environ, v.Name+"="+val)
	}
	args := make([]string, len(c.Args))
	for i, a := range c.Args {
		args[i] = e.local(p, c, a, env)
	}
	cmd := exec.Command(e.binary, args...)
	cmd.Env = append(os.Environ(), environ...)
	return cmd
}

// local applies $(VAR) expansion and the mapping to one argument or env value.
func (e *localEnv) local(p pod, c corev1.Container, s string, env map[string]string) string {
	s = varRef.ReplaceAllStringFunc(s, func(ref string) string {
		if v, ok := env[varRef.FindStringSubmatch(ref)[1]]; ok {
			return v
		}
		return ref // Kubernetes leaves unknown references as they are
	})
	s = e.hosts.ReplaceAllString(s, "127.0.0.1$1")
	s = strings.ReplaceAll(s, "0.0.0.0:", "127.0.0.1:")
	s = strings.ReplaceAll(s, "=0.0.0.0", "=127.0.0.1")
	// Mounts first, on the container's paths: a mapped image path is a local one (the repository's), which
	// a mount path such as /tmp may prefix when the repository is cloned there.
	for _, vm := range c.VolumeMounts { // one mount per value: the mapped path must not be mapped again
		if strings.Contains(s, vm.MountPath+"/") {
			s = strings.ReplaceAll(s, vm.MountPath+"/", filepath.Join(e.tmp, p.name, vm.Name)+"/")
			break
		}
	}
	for from, to := range e.imagePath {
		s = strings.ReplaceAll(s, from, to)
	}
	return s
}

// supervise runs mk's command like a kubelet with restartPolicy Always: it starts the process again when
// it exits (up to 10 times, 500 ms apart) until stop, which ends it with SIGTERM (SIGKILL after 15 s) and
// waits. Output goes to log.
func supervise(t *testing.T, name string, mk func() *exec.Cmd, log *lockedBuffer) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for restarts := 0; ; restarts++ {
			cmd := mk()
			cmd.Stdout, cmd.Stderr = log, log
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if err := cmd.Start(); err != nil {
				t.Errorf("%s: %v", name, err)
				return
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				fmt.Fprintf(log, "--- %s exited: %v (restart %d)\n", name, err, restarts+1)
				if restarts >= 10 {
					t.Errorf("%s keeps exiting: %v", name, err)
					return
				}
				select {
				case <-ctx.Done():
					return
				case <-time.After(500 * time.Millisecond):
				}
			case <-ctx.Done():
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
				select {
				case <-done:
				case <-time.After(15 * time.Second):
					_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
					<-done
				}
				return
			}
		}
	})
	return func() {
		cancel()
		wg.Wait()
	}
}

// lockedBuffer collects the processes' output.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// servicePort resolves a rendered Service's port to the local address that serves it: the Service's
// targetPort (a name or a number) in the containers of the pods it selects.
func servicePort(t *testing.T, svc *corev1.Service, port string, pods []pod) string {
	t.Helper()
	for _, sp := range svc.Spec.Ports {
		if sp.Name != port {
			continue
		}
		for _, p := range pods {
			if !selects(svc.Spec.Selector, p.template.Labels) {
				continue
			}
			for _, c := range p.template.Spec.Containers {
				for _, cp := range c.Ports {
					if (sp.TargetPort.Type == intstr.String && cp.Name == sp.TargetPort.StrVal) || (sp.TargetPort.Type == intstr.Int && cp.ContainerPort == sp.TargetPort.IntVal) {
						if cp.ContainerPort != sp.Port {
							t.Logf("Service %s port %d maps to container port %d", svc.Name, sp.Port, cp.ContainerPort)
						}
						return "127.0.0.1:" + strconv.Itoa(int(cp.ContainerPort))
					}
				}
			}
		}
	}
	t.Fatalf("Service %s: no port %q backed by a rendered container", svc.Name, port)
	return ""
}

func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return len(sel) > 0
}

// TestChartCluster renders the CPU demo chart (ports moved to free ones), starts every rendered pod's
// containers as local processes of the binary built by the Dockerfile's go build line, with their
// rendered command, arguments and environment (Service names mapped to 127.0.0.1), and asks for the
// fixture's greedy ids through the rendered API Service's port: the chart's commands form a cluster. The
// worker's metrics, reached through the workers' Service, show its weight load done.
func TestChartCluster(t *testing.T) {
	helmPath(t)
	bin, err := builtBinary()
	if err != nil {
		t.Fatal(err)
	}
	ports := freePorts(t, 6)
	m := decodeStrict(t, render(t, []string{exampleFile("cpu-demo")},
		"etcd.clientPort="+strconv.Itoa(ports[0]), "etcd.peerPort="+strconv.Itoa(ports[1]),
		"coordinator.grpcPort="+strconv.Itoa(ports[2]), "coordinator.httpPort="+strconv.Itoa(ports[3]),
		"workers.grpcPort="+strconv.Itoa(ports[4]), "workers.metricsPort="+strconv.Itoa(ports[5])))

	var pods []pod
	for _, name := range slices.Sorted(mapKeys(m.statefulSets)) {
		s := m.statefulSets[name]
		for i := range int(*s.Spec.Replicas) {
			pods = append(pods, pod{fmt.Sprintf("%s-%d", name, i), s.Spec.Template})
		}
	}
	for _, name := range slices.Sorted(mapKeys(m.deployments)) {
		d := m.deployments[name]
		for i := range int(*d.Spec.Replicas) {
			pods = append(pods, pod{fmt.Sprintf("%s-%d", name, i), d.Spec.Template})
		}
	}
	env := newLocalEnv(t, m, bin)
	ctx := context.Background()
	log := &lockedBuffer{}
	var stops []func()
	t.Cleanup(func() {
		for _, stop := range slices.Backward(stops) { // clients first, etcd last
			stop()
		}
		if t.Failed() || os.Getenv("TPFLEET_TEST_LOG") != "" {
			t.Logf("processes' output:\n%s", log.String())
		}
	})
	for _, p := range pods {
		if len(p.template.Spec.InitContainers) > 0 {
			t.Fatalf("pod %s has init containers; the CPU demo needs none", p.name)
		}
		for _, c := range p.template.Spec.Containers {
			cmd := env.command(t, p, c)
			t.Logf("pod %s: %s %s", p.name, c.Name, strings.Join(cmd.Args[1:], " "))
			stops = append(stops, supervise(t, p.name+"/"+c.Name, func() *exec.Cmd { return env.command(t, p, c) }, log))
		}
	}

	api := servicePort(t, m.services["tpf-tpfleet"], "http", pods)
	base := "http://" + api
	deadline := time.Now().Add(90 * time.Second)
	for {
		code, _ := httpDo(ctx, http.MethodGet, base+"/health", "")
		if code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s/health = %d after 90s: the rendered cluster does not serve", base, code)
		}
		time.Sleep(100 * time.Millisecond)
	}

	var gold struct {
		Prompt []int `json:"prompt_ids"`
		Greedy []int `json:"greedy_ids"`
	}
	data, err := os.ReadFile(filepath.Join(repoRoot, "testdata", "fixtures", "moe-top1", "golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &gold); err != nil {
		t.Fatal(err)
	}
	prompt, _ := json.Marshal(gold.Prompt)
	body := fmt.Sprintf(`{"prompt": %s, "max_tokens": %d, "temperature": 0, "ignore_eos": true, "return_token_ids": true}`, prompt, len(gold.Greedy))
	code, resp := httpDo(ctx, http.MethodPost, base+"/v1/completions", body)
	var out struct {
		Choices []struct {
			TokenIDs []int `json:"token_ids"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(resp, &out); code != http.StatusOK || err != nil || len(out.Choices) != 1 {
		t.Fatalf("POST %s/v1/completions = %d %s (%v)", base, code, resp, err)
	}
	if !slices.Equal(out.Choices[0].TokenIDs, gold.Greedy) {
		t.Errorf("greedy ids through the rendered Service = %v, want the fixture's %v", out.Choices[0].TokenIDs, gold.Greedy)
	}

	metrics := servicePort(t, m.services["tpf-tpfleet-workers"], "metrics", pods)
	code, resp = httpDo(ctx, http.MethodGet, "http://"+metrics+"/metrics", "")
	if code != http.StatusOK || !strings.Contains(string(resp), "\ntpfleet_weight_load_progress 1\n") {
		t.Errorf("worker /metrics through the workers' Service = %d, want tpfleet_weight_load_progress 1:\n%.2000s", code, resp)
	}
	code, resp = httpDo(ctx, http.MethodGet, base+"/metrics", "")
	if code != http.StatusOK || !strings.Contains(string(resp), `tpfleet_requests_total{outcome="length"} 1`) {
		t.Errorf("coordinator /metrics through the API Service = %d, want one request finished at length:\n%.2000s", code, resp)
	}
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// httpDo sends a request and returns its status and body; status 0 when it could not be sent.
func httpDo(ctx context.Context, method, url, body string) (int, []byte) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		return 0, nil
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}
