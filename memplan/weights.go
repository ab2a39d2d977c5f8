package memplan

import (
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/shard"
)

// WeightBytes is the bytes a rank holds of the weights its manifest gives it, in format f: the quantised
// size (codes and scales, quant.Format.Bytes) of the tensors the model declares Quantizable when f
// quantises, the stored size of the others. It is what the rank's load will hold before it loads.
func WeightBytes(cfg model.Config, man shard.Manifest, f quant.Format) int64 {
	specs := map[string]model.TensorSpec{}
	for _, s := range model.Tensors(cfg) {
		specs[man.Prefix+s.Name] = s
	}
	var n int64
	for _, t := range man.Tensors {
		if s, ok := specs[t.Name]; ok && s.Quantizable && f.Quantized() {
			n += f.Bytes(t.LocalShape, s.InputDim)
			continue
		}
		n += t.Bytes
	}
	return n
}
