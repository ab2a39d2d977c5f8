// Package client is the Go client of tpfleet's gRPC API: a coordinator's Generation service (Generate,
// Tokenize), its Admin service (Shards, Rebalance) and the standard health service (WaitReady).
//
// It is for programs that should not depend on the generated protobuf code: requests and results are
// plain Go types, and the proto types stay inside this package. Errors are gRPC status errors
// (status.Code reads them; a coordinator's carry a google.rpc.ErrorInfo detail of domain "tpfleet.v1"
// whose reason names the failure, such as QUEUE_FULL or NOT_LEADER), or the caller's context error.
//
// # Usage
//
//	cli, err := client.Dial("127.0.0.1:7070")
//	if err != nil { ... }
//	defer cli.Close()
//	ctx, cancel := context.WithTimeout(ctx, time.Minute)
//	defer cancel()
//	res, err := cli.Generate(ctx, client.GenerateRequest{Prompt: "Hello", MaxTokens: 16},
//		func(ids []int, text string) error { fmt.Print(text); return nil })
//
// The package imports the generated code of proto/ and package sample (sampling parameters); it must
// not import coordinator, worker or any backend, so a client links none of them.
package client
