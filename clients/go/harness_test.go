package bwpred_test

// The test harness: a real daemon (`$BWPRED_PYTHON -m bwpredd`, the repo's
// venv python by default) in a child process, serving a real model directory
// made once per run by the Python tests' own helper
// (tests/conftest_models.py).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bwpred "github.com/novacron/bwpredd/clients/go"
)

var (
	repoRoot string // the checkout: ../.. of this package
	python   string // runs the daemon
	modelDir string // a real, small model directory (version "test-1")
)

func TestMain(m *testing.M) {
	os.Exit(setUp(m))
}

func setUp(m *testing.M) int {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	repoRoot = root
	python = os.Getenv("BWPRED_PYTHON")
	if python == "" {
		python = filepath.Join(repoRoot, ".venv", "bin", "python")
	}
	if _, err := os.Stat(python); err != nil {
		fmt.Fprintf(os.Stderr, "bwpred tests need the daemon's python (BWPRED_PYTHON, or run make install): %v\n", err)
		return 1
	}
	tmp, err := os.MkdirTemp("", "bwpred-go-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	modelDir = filepath.Join(tmp, "model")
	cmd := exec.Command(python, "-m", "tests.conftest_models", modelDir)
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "making the model directory: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// daemon is one bwpredd process; restart it with start() on the same
// directory to find its state again.
type daemon struct {
	t      *testing.T
	dir    string // run/ (the socket) and state/
	env    []string
	listen string // the address it was told
	target string // the address it said it listens on

	mu     sync.Mutex
	cmd    *exec.Cmd
	log    bytes.Buffer
	exited chan struct{}
	status error
}

// newDaemon prepares a daemon with a private directory; settings are extra
// BWPREDD_* variables ("GRACE_PERIOD_S=60").
func newDaemon(t *testing.T, settings ...string) *daemon {
	t.Helper()
	dir, err := os.MkdirTemp("", "bwpg") // short: a socket path has ~100 bytes
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, dir: dir, listen: "unix:" + filepath.Join(dir, "run", "bwpredd.sock")}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BWPREDD_") {
			d.env = append(d.env, kv)
		}
	}
	d.env = append(d.env,
		"BWPREDD_METRICS_ADDR=",
		"BWPREDD_STATE_DIR="+filepath.Join(dir, "state"),
		"BWPREDD_MODEL_DIR="+modelDir,
		"BWPREDD_REQUIRE_MODEL=true",
		"BWPREDD_LOG_FORMAT=json",
		"BWPREDD_LOG_RPCS=false",
	)
	for _, kv := range settings {
		if strings.HasPrefix(kv, "LISTEN=") {
			d.listen = strings.TrimPrefix(kv, "LISTEN=")
		} else {
			d.env = append(d.env, "BWPREDD_"+kv)
		}
	}
	t.Cleanup(func() {
		d.kill()
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.logText())
		}
		os.RemoveAll(dir)
	})
	return d
}

// start runs the daemon and waits for its "started" line.
func (d *daemon) start() *daemon {
	d.t.Helper()
	return d.startOn(d.listen)
}

// startOn runs the daemon on another address, same state.
func (d *daemon) startOn(listen string) *daemon {
	d.t.Helper()
	cmd := exec.Command(python, "-m", "bwpredd")
	cmd.Dir = repoRoot
	cmd.Env = append(append([]string{}, d.env...), "BWPREDD_LISTEN="+listen)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		d.t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	started := make(chan string, 1)
	exited := make(chan struct{})
	d.mu.Lock()
	d.cmd, d.exited = cmd, exited
	d.mu.Unlock()
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<16), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			d.mu.Lock()
			d.log.WriteString(line + "\n")
			d.mu.Unlock()
			var ev struct{ Event, Listen string }
			if json.Unmarshal([]byte(line), &ev) == nil && ev.Event == "started" {
				started <- ev.Listen
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		err := cmd.Wait()
		d.mu.Lock()
		d.status = err
		d.mu.Unlock()
		close(exited)
	}()
	select {
	case d.target = <-started:
	case <-exited:
		d.t.Fatalf("daemon exited at start-up (%v):\n%s", d.status, d.logText())
	case <-time.After(60 * time.Second):
		d.t.Fatalf("daemon did not start in 60 s:\n%s", d.logText())
	}
	return d
}

func (d *daemon) signal(sig syscall.Signal) {
	d.t.Helper()
	d.mu.Lock()
	cmd := d.cmd
	d.mu.Unlock()
	if err := cmd.Process.Signal(sig); err != nil {
		d.t.Fatalf("signal %v: %v", sig, err)
	}
}

// wait waits for the daemon to exit and returns its exit error (nil for 0).
func (d *daemon) wait(timeout time.Duration) error {
	d.t.Helper()
	select {
	case <-d.exited:
	case <-time.After(timeout):
		d.t.Fatalf("daemon still running after %s:\n%s", timeout, d.logText())
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.status
}

// stop ends the daemon with SIGTERM and checks it exited cleanly.
func (d *daemon) stop() {
	d.t.Helper()
	d.signal(syscall.SIGTERM)
	if err := d.wait(30 * time.Second); err != nil {
		d.t.Fatalf("daemon exit: %v", err)
	}
}

func (d *daemon) kill() {
	d.mu.Lock()
	cmd, exited := d.cmd, d.exited
	d.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-exited:
		return
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGCONT)
	_ = cmd.Process.Kill()
	<-exited
}

func (d *daemon) logText() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.log.String()
}

// dial connects a client to the daemon's address and waits until it serves.
func (d *daemon) dial(opts ...bwpred.Option) *bwpred.Client {
	d.t.Helper()
	c := dialTo(d.t, d.target, opts...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.WaitReady(ctx); err != nil {
		d.t.Fatal(err)
	}
	return c
}

func dialTo(t *testing.T, target string, opts ...bwpred.Option) *bwpred.Client {
	t.Helper()
	c, err := bwpred.Dial(context.Background(), target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// eventually polls cond until it holds, failing the test after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
