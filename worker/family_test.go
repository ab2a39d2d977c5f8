package worker_test

// The worker knows no model family; the tests serve Llama 4 fixtures, so they register it as the binary
// does.
import _ "github.com/tpfleet/tpfleet/model/llama4"
