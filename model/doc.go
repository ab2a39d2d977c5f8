// Package model is what tpfleet knows of a model without running it: its configuration (Config, read from
// config.json through a registry keyed by the checkpoint's architectures and model_type), the tensors it
// reads (TensorSpec: checkpoint name, shape, the dimensions a rank may take a slice of and in units of
// what, and the groups of tensors whose splits must fit each other), how a rank's slice was cut (Layout),
// and its generation defaults (Generation).
//
// A model family declares its tensors once, as a typed tree of structs whose fields carry struct tags: the
// checkpoint name and the tensor-parallel role of each tensor (see Tree for the tag vocabulary). From that
// one declaration this package derives the list of tensor specs (Tensors), which shard plans splits from,
// and fills the tree at load time (Load) through a Weights loader, with reflection at load time only.
//
// The package is model-neutral and backend-free: it imports no backend, no communicator and no cgo, so
// the coordinator and shard use it while linking no device code. Running a model is package model/run's
// business; families (model/llama4) register themselves with Register from their init functions, and a
// binary imports them for that effect.
package model
