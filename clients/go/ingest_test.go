package bwpred_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	bwpred "github.com/novacron/bwpredd/clients/go"
)

// plan is a sequence of samples spread round-robin over peers, each with a
// bandwidth no other sample has and a later timestamp than the one before,
// so every window tells exactly which samples it holds.
type plan struct {
	peers   int
	samples []*bwpred.Sample
}

func newPlan(peers, total int) *plan {
	p := &plan{peers: peers}
	base := time.Now().Add(-time.Minute)
	for k := 0; k < total; k++ {
		s := bwpred.NewSample(p.peer(k), float64(100+k))
		s.LatencyMs = proto.Float64(1 + float64(k%7))
		s.Timestamp = timestamppb.New(base.Add(time.Duration(k) * time.Millisecond))
		p.samples = append(p.samples, s)
	}
	return p
}

func (p *plan) peer(k int) string { return fmt.Sprintf("node-%03d", k%p.peers) }

// checkWindows asserts that the daemon holds exactly the first n samples of
// the plan: each in its peer's window, once, in order, and no other.
func (p *plan) checkWindows(t *testing.T, c *bwpred.Client, n int) {
	t.Helper()
	ctx := ctxFor(t, 30*time.Second)
	for peer := 0; peer < p.peers; peer++ {
		var want []float64
		for k := peer; k < n; k += p.peers {
			want = append(want, p.samples[k].GetBandwidthMbps())
		}
		if len(want) > 10 {
			t.Fatalf("plan too long: peer %d has %d samples, a window holds 10", peer, len(want))
		}
		got, err := c.GetPeer(ctx, p.peer(peer))
		if len(want) == 0 {
			if status.Code(err) != codes.NotFound {
				t.Errorf("%s: want NotFound (no sample of it acknowledged), got %v", p.peer(peer), err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", p.peer(peer), err)
		}
		var have []float64
		for _, s := range got.Window {
			have = append(have, s.GetBandwidthMbps())
		}
		if fmt.Sprint(have) != fmt.Sprint(want) || got.SampleCount != uint64(len(want)) {
			t.Errorf("%s: window %v (sample_count %d), want %v (%d)",
				p.peer(peer), have, got.SampleCount, want, len(want))
		}
	}
}

// waitStopped waits until every thread of pid is stopped (SIGSTOP taken), so
// that what is sent next is surely not read.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	eventually(t, 10*time.Second, "daemon stopped", func() bool {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		for _, f := range tasks {
			b, err := os.ReadFile(f)
			if err != nil {
				return false
			}
			fields := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
			if len(fields) == 0 || fields[0] != "T" {
				return false
			}
		}
		return len(tasks) > 0
	})
}

func (d *daemon) pid() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cmd.Process.Pid
}

func newIngester(t *testing.T, c *bwpred.Client, opt bwpred.IngestOptions) *bwpred.Ingester {
	t.Helper()
	ing, err := c.NewIngester(opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = ing.Close(ctx)
	})
	return ing
}

func add(t *testing.T, ing *bwpred.Ingester, samples []*bwpred.Sample) {
	t.Helper()
	if err := ing.Add(ctxFor(t, 30*time.Second), samples...); err != nil {
		t.Fatal(err)
	}
}

func flush(t *testing.T, ing *bwpred.Ingester) {
	t.Helper()
	if err := ing.Flush(ctxFor(t, 60*time.Second)); err != nil {
		t.Fatalf("%v (stats %+v)", err, ing.Stats())
	}
}

// TestIngestReportsRejectionsKeepsOthers: bad samples are reported with the
// field at fault; the good ones of the same batches are stored.
func TestIngestReportsRejectionsKeepsOthers(t *testing.T) {
	d := newDaemon(t).start()
	c := d.dial()
	type rejected struct{ peer, field, reason string }
	var mu sync.Mutex
	got := map[*bwpred.Sample]rejected{}
	ing := newIngester(t, c, bwpred.IngestOptions{
		BatchSize: 4,
		OnRejection: func(s *bwpred.Sample, r *bwpred.Rejection) {
			mu.Lock()
			got[s] = rejected{s.PeerId, r.Field, r.Reason}
			mu.Unlock()
		},
	})
	noBandwidth := &bwpred.Sample{PeerId: "good-b"}
	lossy := bwpred.NewSample("good-b", 12)
	lossy.PacketLoss = proto.Float64(2)
	badID := bwpred.NewSample("bad id!", 5)
	nan := bwpred.NewSample("good-a", math.NaN())
	negative := bwpred.NewSample("good-a", -1)
	samples := []*bwpred.Sample{
		bwpred.NewSample("good-a", 10), badID, bwpred.NewSample("good-a", 11), noBandwidth,
		nan, lossy, negative, bwpred.NewSample("good-a", 13), bwpred.NewSample("good-b", 14),
	}
	add(t, ing, samples)
	flush(t, ing)

	want := map[*bwpred.Sample]string{
		badID: "peer_id", noBandwidth: "bandwidth_mbps", nan: "bandwidth_mbps",
		lossy: "packet_loss", negative: "bandwidth_mbps",
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != len(want) {
		t.Errorf("rejections reported: %v, want %d", got, len(want))
	}
	for s, field := range want {
		r, ok := got[s]
		if !ok || r.field != field || !strings.Contains(r.reason, field) {
			t.Errorf("sample %v: rejection %+v, want field %q named in the reason", s, r, field)
		}
	}
	st := ing.Stats()
	if st.Accepted != 4 || st.Rejected != 5 || st.Queued != 0 {
		t.Errorf("stats %+v: want 4 accepted, 5 rejected, none queued", st)
	}
	ctx := ctxFor(t, 10*time.Second)
	for peer, want := range map[string]string{"good-a": "[10 11 13]", "good-b": "[14]"} {
		p, err := c.GetPeer(ctx, peer)
		if err != nil {
			t.Fatal(err)
		}
		var have []float64
		for _, s := range p.Window {
			have = append(have, s.GetBandwidthMbps())
		}
		if fmt.Sprint(have) != want {
			t.Errorf("%s window %v, want %s", peer, have, want)
		}
	}
}

// TestIngestAcrossSIGTERMRestart: a daemon shut down mid-stream (SIGTERM,
// NOT_SERVING, drain) has every acknowledged sample in the windows it
// restores; the rest are sent to the new daemon, each sample stored once. The
// grace period is 60 s, so the daemon exits within the test's 30 s only
// because the Ingester closes its stream when it sees NOT_SERVING.
func TestIngestAcrossSIGTERMRestart(t *testing.T) {
	d := newDaemon(t, "GRACE_PERIOD_S=60").start()
	c := d.dial()
	ing := newIngester(t, c, bwpred.IngestOptions{BatchSize: 50, FlushInterval: 5 * time.Millisecond})
	p := newPlan(60, 600)

	add(t, ing, p.samples[:300])
	flush(t, ing)
	// Freeze the daemon so the next samples are in flight when SIGTERM lands.
	d.signal(syscall.SIGSTOP)
	waitStopped(t, d.pid())
	add(t, ing, p.samples[300:400])
	eventually(t, 10*time.Second, "samples in flight", func() bool { return ing.Stats().InFlight > 0 })
	d.signal(syscall.SIGTERM)
	d.signal(syscall.SIGCONT)
	stopped := time.Now()
	if err := d.wait(30 * time.Second); err != nil {
		t.Fatalf("daemon exit: %v", err)
	}
	t.Logf("SIGTERM with a stream open: daemon exited after %s (grace period 60 s)",
		time.Since(stopped).Round(time.Millisecond))
	add(t, ing, p.samples[400:500]) // while no daemon runs
	st := ing.Stats()
	acked := int(st.Accepted + st.Rejected)
	if acked < 300 || acked > 400 || st.Rejected != 0 {
		t.Fatalf("after the drain: %+v, want 300..400 accepted", st)
	}

	// Every acknowledged sample is in the restored windows, nothing else:
	// looked at by a daemon on another socket, so the Ingester cannot reach it.
	check := d.startOn("unix:" + filepath.Join(d.dir, "check", "bwpredd.sock"))
	cc := dialTo(t, check.target)
	if err := cc.WaitReady(ctxFor(t, 30*time.Second)); err != nil {
		t.Fatal(err)
	}
	p.checkWindows(t, cc, acked)
	cc.Close()
	check.stop()

	d.start() // the Ingester's socket again
	add(t, ing, p.samples[500:])
	flush(t, ing)
	p.checkWindows(t, d.dial(), len(p.samples))
	st = ing.Stats()
	if st.Accepted != 600 || st.Streams < 2 || st.Queued != 0 {
		t.Errorf("stats %+v: want 600 accepted over >= 2 streams", st)
	}
	t.Logf("stats: %+v", st)
	if err := ing.Close(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	d.stop()
}

// TestIngestAcrossSIGKILL: samples sent to a daemon that is then killed
// unacknowledged are sent again to the next one; the samples it had
// acknowledged and snapshotted are restored.
func TestIngestAcrossSIGKILL(t *testing.T) {
	d := newDaemon(t, "SNAPSHOT_INTERVAL_S=0.2").start()
	c := d.dial()
	ing := newIngester(t, c, bwpred.IngestOptions{BatchSize: 40, FlushInterval: 5 * time.Millisecond})
	p := newPlan(50, 500)

	add(t, ing, p.samples[:200])
	flush(t, ing)
	time.Sleep(time.Second) // several snapshot intervals: the 200 are on disk
	d.signal(syscall.SIGSTOP)
	waitStopped(t, d.pid())
	add(t, ing, p.samples[200:300])
	eventually(t, 10*time.Second, "100 samples in flight", func() bool { return ing.Stats().InFlight == 100 })
	d.signal(syscall.SIGKILL)
	_ = d.wait(10 * time.Second)
	add(t, ing, p.samples[300:400])
	if st := ing.Stats(); st.Accepted != 200 || st.Queued != 200 {
		t.Fatalf("after the kill: %+v, want 200 accepted, 200 queued", st)
	}

	d.start()
	add(t, ing, p.samples[400:])
	flush(t, ing)
	p.checkWindows(t, d.dial(), len(p.samples))
	st := ing.Stats()
	if st.Accepted != 500 || st.Resent < 100 || st.Streams < 2 {
		t.Errorf("stats %+v: want 500 accepted, >= 100 resent, >= 2 streams", st)
	}
	t.Logf("stats: %+v", st)
}

// TestBackPressure: the queue is bounded; when it is full Add drops
// (DropWhenFull) or waits (BlockWhenFull) until the daemon takes samples.
func TestBackPressure(t *testing.T) {
	d := newDaemon(t) // not started yet: nothing is acknowledged
	c := dialTo(t, d.listen)
	sample := func(peer string, k int) *bwpred.Sample { return bwpred.NewSample(peer, float64(k)) }

	drop := newIngester(t, c, bwpred.IngestOptions{QueueSize: 10, WhenFull: bwpred.DropWhenFull})
	for k := 0; k < 10; k++ {
		if err := drop.Add(context.Background(), sample("drop", k)); err != nil {
			t.Fatal(err)
		}
	}
	if err := drop.Add(context.Background(), sample("drop", 10)); !errors.Is(err, bwpred.ErrQueueFull) {
		t.Fatalf("Add to a full DropWhenFull queue: %v, want ErrQueueFull", err)
	}
	if st := drop.Stats(); st.Dropped != 1 || st.Queued != 10 {
		t.Fatalf("drop stats %+v: want 1 dropped, 10 queued", st)
	}

	block := newIngester(t, c, bwpred.IngestOptions{QueueSize: 10})
	var ten []*bwpred.Sample
	for k := 0; k < 10; k++ {
		ten = append(ten, sample("block", k))
	}
	add(t, block, ten)
	err := block.Add(ctxFor(t, 200*time.Millisecond), sample("block", 10))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Add to a full BlockWhenFull queue: %v, want the context's deadline", err)
	}
	if err := block.Add(context.Background(), append(ten, sample("block", 10))...); err == nil ||
		!strings.Contains(err.Error(), "QueueSize") {
		t.Fatalf("Add of more than QueueSize: %v, want an error naming QueueSize", err)
	}
	blocked := make(chan error, 1)
	go func() { blocked <- block.Add(context.Background(), sample("block", 11)) }()
	select {
	case err := <-blocked:
		t.Fatalf("Add returned (%v) while the queue was full", err)
	case <-time.After(300 * time.Millisecond):
	}
	st := block.Stats()
	if st.LastError == nil || st.Connected || st.Queued != 10 {
		t.Fatalf("stats without a daemon %+v: want an error, not connected, 10 queued", st)
	}

	d.start()
	select {
	case err := <-blocked:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Add still blocked after the daemon started")
	}
	flush(t, block)
	flush(t, drop)
	ctx := ctxFor(t, 10*time.Second)
	for peer, count := range map[string]uint64{"drop": 10, "block": 11} {
		got, err := c.GetPeer(ctx, peer)
		if err != nil {
			t.Fatal(err)
		}
		if got.SampleCount != count {
			t.Errorf("%s: %d samples stored, want %d", peer, got.SampleCount, count)
		}
	}
}

// TestIngesterOptionsAndClose: bad options are refused naming the field; a
// closed Ingester refuses samples; Close with samples it cannot deliver says
// how many.
func TestIngesterOptionsAndClose(t *testing.T) {
	c := dialTo(t, "unix:/nonexistent/bwpredd.sock")
	for _, tc := range []struct {
		opt   bwpred.IngestOptions
		field string
	}{
		{bwpred.IngestOptions{QueueSize: -1}, "QueueSize"},
		{bwpred.IngestOptions{BatchSize: -1}, "BatchSize"},
		{bwpred.IngestOptions{MaxInFlight: -1}, "MaxInFlight"},
		{bwpred.IngestOptions{FlushInterval: -time.Second}, "FlushInterval"},
		{bwpred.IngestOptions{WhenFull: 7}, "WhenFull"},
	} {
		if _, err := c.NewIngester(tc.opt); err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%+v: %v, want an error naming %s", tc.opt, err, tc.field)
		}
	}
	ing, err := c.NewIngester(bwpred.IngestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	add(t, ing, []*bwpred.Sample{bwpred.NewSample("a", 1), bwpred.NewSample("a", 2)})
	err = ing.Close(ctxFor(t, 300*time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "2 samples") {
		t.Errorf("Close without a daemon: %v, want the deadline and the 2 samples left", err)
	}
	if err := ing.Add(context.Background(), bwpred.NewSample("a", 3)); !errors.Is(err, bwpred.ErrClosed) {
		t.Errorf("Add after Close: %v, want ErrClosed", err)
	}
}
