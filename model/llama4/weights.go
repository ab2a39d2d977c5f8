package llama4

import (
	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/safetensors"
)

// CheckpointWeights loads whole tensors from a safetensors checkpoint into a backend: the Weights of a
// single rank; see run.CheckpointWeights.
type CheckpointWeights = run.CheckpointWeights

// NewCheckpointWeights reads cfg's tensors from ckpt into ops. Names are looked up with cfg.Prefix, so
// multimodal checkpoints' "language_model." keys work.
func NewCheckpointWeights(ckpt *safetensors.Checkpoint, ops backend.Ops, cfg Config) *CheckpointWeights {
	return run.NewCheckpointWeights(ckpt, ops, cfg)
}
