// Package llama4 is the Llama 4 text model (Scout, Maverick and any checkpoint of that architecture):
// its configuration, its weights by HF checkpoint name, and its forward pass, written once over
// backend.Ops in the vocabulary of the paper (embed, norm, attention, moe, lm_head). The comments cite the
// sections of shared/reference/llama4-spec.md each step implements. The package knows nothing of gRPC,
// processes or devices: a rank's slice of the model and its communicator come in through Parallel.
package llama4
