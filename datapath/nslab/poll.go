package nslab

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"
)

// Poll calls fn every interval until it returns nil or ctx ends; then it returns the last
// error of fn, wrapped with the context's error. It is the one poll loop of weft's kernel
// and lab tests: wait for a condition with a deadline, never sleep a fixed time.
func Poll(ctx context.Context, interval time.Duration, fn func() error) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		err := fn()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %w)", ctx.Err(), err)
		case <-t.C:
		}
	}
}

// Eventually is Poll for a test: it polls cond (whose error says what is not there yet)
// every 100 ms for up to timeout, and fails t naming what it waited for.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	EventuallyEvery(t, timeout, 100*time.Millisecond, what, cond)
}

// EventuallyEvery is Eventually with its own interval, for in-process tests whose
// conditions change within milliseconds.
func EventuallyEvery(t testing.TB, timeout, interval time.Duration, what string, cond func() error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	if err := Poll(ctx, interval, cond); err != nil {
		t.Fatalf("%s: not within %s: %v", what, timeout, err)
	}
}

// NewTest builds a lab for a test and removes it when the test ends. Not being root is a
// failure, not a skip: CI runs as root.
func NewTest(t testing.TB, cfg Config) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root: it builds network namespaces, veths and bridges")
	}
	l, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	return l
}
