package model

// KVLayer is one decoder layer's key/value cache as the model declares it, before tensor parallelism:
// what a memory planner needs to size a paged cache without knowing the family.
type KVLayer struct {
	// KVHeads and HeadDim are the layer's key/value heads and their size: one token costs 2·KVHeads·HeadDim
	// elements (keys and values) on one rank of TP 1.
	KVHeads, HeadDim int
	// Window is the most past tokens the layer attends to (chunked attention: the chunk size); 0 means
	// every token (global attention), so its cache grows with the context.
	Window int
}

// Memory is implemented by Configs whose key/value cache and step activations a memory planner can size
// (package memplan); found by type assertion. Implementations are values, safe for concurrent use.
type Memory interface {
	// KVLayers is every decoder layer's cache, in layer order.
	KVLayers() []KVLayer
	// StepBytes is an upper estimate of the bytes of activations and workspace one rank of a TP group of
	// tp needs for a step that feeds tokens new tokens (the largest step the scheduler sends), in float32.
	StepBytes(tokens, tp int) int64
}
