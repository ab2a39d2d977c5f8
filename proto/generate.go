// Package proto holds tpfleet's gRPC API: tpfleet/v1/*.proto and the Go code generated from them (committed,
// so normal builds need neither protoc nor its plugins). `make proto` regenerates it with the pinned plugins.
package proto

//go:generate protoc -I . --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative tpfleet/v1/common.proto tpfleet/v1/client.proto tpfleet/v1/worker.proto tpfleet/v1/admin.proto
