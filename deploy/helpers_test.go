package deploy_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Paths, relative to this module's directory (deploy/).
const (
	repoRoot = ".."
	chartDir = "helm/tpfleet"
	examples = "helm/examples"
)

// valueSets are the example value sets of helm/examples that CI lints and renders.
var valueSets = []string{"1node-8gpu-tp8", "2node-8gpu-tp8-2replicas", "2node-4gpu-tp8", "cpu-demo"}

// helmPath finds helm: $HELM, then the repository's bin/helm (make helm installs it there), then PATH.
// Without one the test fails under CI (CI=true) and is skipped elsewhere.
func helmPath(t *testing.T) string {
	t.Helper()
	candidates := []string{os.Getenv("HELM"), filepath.Join(repoRoot, "bin", "helm")}
	for _, c := range candidates {
		if c == "" {
			continue
		}
		if abs, err := filepath.Abs(c); err == nil {
			if st, err := os.Stat(abs); err == nil && !st.IsDir() {
				return abs
			}
		}
	}
	if p, err := exec.LookPath("helm"); err == nil {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatal("helm not found ($HELM, bin/helm, PATH); make helm installs it")
	}
	t.Skip("helm not found ($HELM, bin/helm, PATH); make helm installs it")
	return ""
}

// runHelm runs helm with args and returns its stdout and stderr; err is its exit error.
func runHelm(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, helmPath(t), args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+t.TempDir(), "HELM_CONFIG_HOME="+t.TempDir(), "HELM_DATA_HOME="+t.TempDir())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// render runs helm template for the release "tpf" in namespace "llm" with the value files and --set
// values given, and returns the rendered documents (empty ones dropped).
func render(t *testing.T, valueFiles []string, set ...string) [][]byte {
	t.Helper()
	args := []string{"template", "tpf", chartDir, "--namespace", "llm"}
	for _, f := range valueFiles {
		args = append(args, "-f", f)
	}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	stdout, stderr, err := runHelm(t, args...)
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return splitDocs([]byte(stdout))
}

// splitDocs splits a YAML stream at its "---" lines, dropping documents with nothing but comments.
func splitDocs(stream []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(stream, []byte("\n---")) {
		d = bytes.TrimPrefix(d, []byte("---"))
		empty := true
		for _, line := range bytes.Split(d, []byte("\n")) {
			l := bytes.TrimSpace(line)
			if len(l) > 0 && l[0] != '#' {
				empty = false
				break
			}
		}
		if !empty {
			docs = append(docs, d)
		}
	}
	return docs
}

// exampleFile is the path of an example value set.
func exampleFile(name string) string { return filepath.Join(examples, name+".yaml") }

// exitErr reports whether err is a process that ran and failed.
func exitErr(err error) bool {
	var ee *exec.ExitError
	return errors.As(err, &ee)
}
