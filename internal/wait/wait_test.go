package wait_test

import (
	"context"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/internal/wait"
)

func TestSleep(t *testing.T) {
	if !wait.Sleep(context.Background(), time.Millisecond) {
		t.Error("Sleep(live ctx, 1ms) = false, want true")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	if wait.Sleep(ctx, time.Hour) || time.Since(start) > time.Second {
		t.Error("Sleep(cancelled ctx, 1h) did not return false at once")
	}
}
