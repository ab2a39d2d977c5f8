package backend_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/quant"
)

// bf16Only is a backend without QuantizedLoader; only Name is called.
type bf16Only struct{ backend.Ops }

func (bf16Only) Name() string { return "cuda" }

func TestCheckQuantized(t *testing.T) {
	ops := bf16Only{}
	if err := backend.CheckQuantized(ops, quant.Format{}); err != nil {
		t.Errorf("CheckQuantized(bf16) = %v, want nil", err)
	}
	for _, f := range []quant.Format{{Kind: quant.FP8, DynamicActivations: true}, {Kind: quant.Int4, GroupSize: 128}} {
		err := backend.CheckQuantized(ops, f)
		if !errors.Is(err, errors.ErrUnsupported) || !strings.Contains(err.Error(), "backend cuda: "+f.String()+" weights") || strings.Contains(err.Error(), "\n") {
			t.Errorf("CheckQuantized(%s) = %v, want one line wrapping errors.ErrUnsupported naming cuda and the format", f, err)
		}
		if _, err2 := backend.LoadQuantized(ops, quant.Weight{Format: f}); err2 == nil || err2.Error() != err.Error() {
			t.Errorf("LoadQuantized(%s) = %v, want %v", f, err2, err)
		}
	}
}
