package phase

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestRecorder(t *testing.T) {
	start := time.Now().Add(-time.Second)
	r := NewRecorder(start)
	r.Add(Read, start.Add(3*time.Second), 2*time.Second, "1.0 GB")
	r.Add(Context, start.Add(1200*time.Millisecond), 300*time.Millisecond, "")
	r.Add(Read, start.Add(2*time.Second), 1500*time.Millisecond, "replaced")
	r.Add(Ready, start, 4*time.Second, "")
	var names []string
	for _, p := range r.Phases() {
		names = append(names, p.Name)
	}
	if got, want := strings.Join(names, ","), "process,cuda-context,weight-read,ready"; got != want {
		t.Errorf("Phases() names = %s, want %s", got, want)
	}
	if p := r.Phases()[0]; p.Took < time.Second || p.Took > time.Minute {
		t.Errorf("process phase took %v, want about 1s", p.Took)
	}
	tab := r.Table()
	for _, want := range []string{"weight-read", "    2.000s", "    1.500s  replaced", "cuda-context"} {
		if !strings.Contains(tab, want) {
			t.Errorf("Table() = \n%s\nwant it to contain %q", tab, want)
		}
	}
	core, logs := observer.New(zap.InfoLevel)
	zap.New(core).Info("start-up", r.Field())
	m := logs.All()[0].ContextMap()["phases"].(map[string]any)
	if rd := m["weight-read"].(map[string]any); rd["took"] != 1500*time.Millisecond || rd["detail"] != "replaced" {
		t.Errorf("logged weight-read = %v", rd)
	}
}

func TestProcessStart(t *testing.T) {
	s := ProcessStart()
	if age := time.Since(s); age < 0 || age > 10*time.Minute {
		t.Errorf("ProcessStart() is %v ago, want within the test binary's life", age)
	}
}
