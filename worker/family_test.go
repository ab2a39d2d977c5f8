package worker_test

// The worker knows no model family and no backend implementation; the tests serve Llama 4 fixtures on the
// CPU, so they register both as the binary does.
import (
	_ "github.com/tpfleet/tpfleet/backend/cpu"
	_ "github.com/tpfleet/tpfleet/model/llama4"
)
