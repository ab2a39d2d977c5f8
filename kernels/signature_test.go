package kernels

import (
	"slices"
	"testing"
)

func TestSignatures(t *testing.T) {
	src := `
#define PAIR_PARAMS const float* a, \
	int n /* rows */
#define MORE PAIR_PARAMS, long long m
#define SQ(x) ((x) * (x))
extern "C" __global__ void plain(const void* __restrict__ x, int xdt, float* y, unsigned long long n, float s, bool on) {}
extern "C" __global__ void __launch_bounds__(128, 4) bounded(
	int* cnt, // counters
	const long long* rows) {}
extern "C" __global__ void macro(MORE) {}
extern "C" __global__ void none() {}
`
	sigs, err := Signatures(src)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]Param{
		"plain": {
			{"const void* __restrict__", "x", KindPointer}, {"int", "xdt", KindInt32}, {"float*", "y", KindPointer},
			{"unsigned long long", "n", KindInt64}, {"float", "s", KindFloat32}, {"bool", "on", KindBool},
		},
		"bounded": {{"int*", "cnt", KindPointer}, {"const long long*", "rows", KindPointer}},
		"macro":   {{"const float*", "a", KindPointer}, {"int", "n", KindInt32}, {"long long", "m", KindInt64}},
		"none":    nil,
	}
	if len(sigs) != len(want) {
		t.Errorf("got %d kernels, want %d: %v", len(sigs), len(want), sigs)
	}
	for name, w := range want {
		if got, ok := sigs[name]; !ok || !slices.Equal(got, w) {
			t.Errorf("%s: got %v, want %v", name, got, w)
		}
	}
}

func TestSignaturesRefuse(t *testing.T) {
	for _, src := range []string{
		`extern "C" __global__ void open(int n {}`,
		`extern "C" __global__ void nameless(int, float* y) {}`,
		`extern "C" __global__ void star(float*) {}`,
	} {
		if sigs, err := Signatures(src); err == nil {
			t.Errorf("%s: no error (got %v)", src, sigs)
		}
	}
}

// TestUnitSignatures parses every unit's kernels: each entry has its parameters, of kinds a launch
// can pass (a struct by value could not be).
func TestUnitSignatures(t *testing.T) {
	n := 0
	for _, u := range Units() {
		src := u.Source()
		sigs, err := Signatures(src)
		if err != nil {
			t.Fatalf("%s: %v", u.Name, err)
		}
		for _, name := range Entries(src) {
			params, ok := sigs[name]
			if !ok {
				t.Errorf("%s: %s has no signature", u.Name, name)
			}
			for _, p := range params {
				if p.Kind == KindOther {
					t.Errorf("%s: %s: parameter %s is of no kind a launch passes", u.Name, name, p)
				}
			}
			n++
		}
	}
	if n < 100 {
		t.Errorf("%d kernels in the units: fewer than expected", n)
	}
}
