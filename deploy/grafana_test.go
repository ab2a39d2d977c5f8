package deploy_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestGrafanaDashboard: the dashboard is JSON with panels, and every tpfleet_ metric its queries use is
// one the coordinator or the worker defines (a renamed metric breaks this test, not the dashboard).
func TestGrafanaDashboard(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("grafana", "tpfleet.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("grafana/tpfleet.json: %v", err)
	}
	var src strings.Builder
	for _, f := range []string{"coordinator/metrics.go", "worker/metrics.go"} {
		b, err := os.ReadFile(filepath.Join(repoRoot, f))
		if err != nil {
			t.Fatal(err)
		}
		src.Write(b)
	}
	defined := src.String()
	name := regexp.MustCompile(`tpfleet_[a-z0-9_]+`)
	queries := 0
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			queries++
			for _, m := range name.FindAllString(tg.Expr, -1) {
				base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_sum"), "_count")
				if !strings.Contains(defined, `"`+base+`"`) {
					t.Errorf("panel %q queries %s, which no tpfleet metric defines", p.Title, m)
				}
			}
		}
	}
	if d.Title == "" || queries < 10 {
		t.Errorf("dashboard %q has %d queries", d.Title, queries)
	}
}
