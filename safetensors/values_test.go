package safetensors_test

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/safetensors"
)

func TestCheckpointValues(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.safetensors")
	err := safetensors.WriteFile(path, []safetensors.Tensor{
		safetensors.F32Tensor("f", []int{2, 2}, []float32{1, -2, 3.5, 0}),
		safetensors.I64Tensor("ids", []int{3}, []int64{7, 0, 511}),
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := safetensors.OpenCheckpoint(path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, shape, err := c.Float32s("f")
	if err != nil || !slices.Equal(f, []float32{1, -2, 3.5, 0}) || !slices.Equal(shape, []int{2, 2}) {
		t.Errorf("Float32s(f) = %v, %v, %v", f, shape, err)
	}
	ids, shape, err := c.Int64s("ids")
	if err != nil || !slices.Equal(ids, []int64{7, 0, 511}) || !slices.Equal(shape, []int{3}) {
		t.Errorf("Int64s(ids) = %v, %v, %v", ids, shape, err)
	}
	if _, _, err := c.Int64s("f"); err == nil {
		t.Errorf("Int64s of a float tensor succeeded")
	}
	if _, _, err := c.Float32s("missing"); !errors.Is(err, safetensors.ErrNotFound) {
		t.Errorf("Float32s(missing) error = %v, want ErrNotFound", err)
	}
}
