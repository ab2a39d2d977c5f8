package safetensors_test

import (
	"bytes"
	"fmt"
	"log"

	"github.com/tpfleet/tpfleet/safetensors"
)

// Write a checkpoint, then read one rank's columns of a weight as a
// tensor-parallel loader would.
func Example() {
	var buf bytes.Buffer
	weight := safetensors.F32Tensor("proj.weight", []int{2, 4}, []float32{
		0, 1, 2, 3,
		4, 5, 6, 7,
	})
	ids := safetensors.I64Tensor("ids", []int{3}, []int64{1, 475, 188})
	if err := safetensors.Write(&buf, []safetensors.Tensor{weight, ids}, map[string]string{"format": "pt"}); err != nil {
		log.Fatal(err)
	}

	f, err := safetensors.OpenSource("example.safetensors", bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		log.Fatal(err)
	}
	for _, t := range f.Tensors() {
		fmt.Println(t.Name, t.DType, t.Shape, t.NumBytes())
	}

	// Rank 1 of 2 takes columns [2, 4) of every row.
	data, shape, err := f.ReadSlice("proj.weight", 1, safetensors.Range{Start: 2, End: 4})
	if err != nil {
		log.Fatal(err)
	}
	vals := make([]float32, len(data)/4)
	if err := safetensors.ToFloat32(safetensors.F32, data, vals); err != nil {
		log.Fatal(err)
	}
	fmt.Println(shape, vals)

	if _, err := f.Info("missing"); err != nil {
		fmt.Println(err)
	}
	// Output:
	// ids I64 [3] 24
	// proj.weight F32 [2 4] 32
	// [2 2] [2 3 6 7]
	// safetensors: example.safetensors: tensor not found: "missing"
}
