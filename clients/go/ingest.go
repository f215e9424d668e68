package bwpred

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"sync"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// FullPolicy says what Ingester.Add does when the queue has no room for the
// samples it is given.
type FullPolicy int

const (
	// BlockWhenFull makes Add wait until there is room or its context ends.
	// Nothing is lost; a daemon that is away or slow slows the caller.
	BlockWhenFull FullPolicy = iota
	// DropWhenFull makes Add return ErrQueueFull at once, dropping the samples
	// it was given (counted in Stats.Dropped). The caller never waits;
	// samples measured while the daemon is away for long are lost.
	DropWhenFull
)

// Errors of Ingester.Add, Flush and Close.
var (
	// ErrQueueFull: DropWhenFull and no room; the samples were dropped.
	ErrQueueFull = errors.New("bwpred: ingest queue full, samples dropped")
	// ErrClosed: the Ingester is closed (or closing).
	ErrClosed = errors.New("bwpred: ingester closed")
)

// Defaults of IngestOptions.
const (
	DefaultQueueSize     = 100_000
	DefaultBatchSize     = 1000
	DefaultFlushInterval = 50 * time.Millisecond
	DefaultMaxInFlight   = 4
)

// healthTimeout bounds the health check made before each stream is opened.
const healthTimeout = 2 * time.Second

// IngestOptions configures an Ingester; a zero field takes its default.
type IngestOptions struct {
	// QueueSize is how many samples may wait for their acknowledgement,
	// queued or sent (DefaultQueueSize). It bounds the Ingester's memory.
	QueueSize int
	// WhenFull is what Add does when the queue has no room: BlockWhenFull
	// (the zero value) or DropWhenFull.
	WhenFull FullPolicy
	// BatchSize is the most samples sent in one request (DefaultBatchSize);
	// keep it within the daemon's max_batch_samples (10,000 by default).
	BatchSize int
	// FlushInterval is how long a batch that is not full waits for more
	// samples before it is sent (DefaultFlushInterval).
	FlushInterval time.Duration
	// MaxInFlight is how many batches may be sent and not yet acknowledged
	// (DefaultMaxInFlight).
	MaxInFlight int
	// OnRejection, when set, is called for each sample the daemon rejected,
	// with the rejection naming the field and the rule. It runs on the
	// Ingester's receiving goroutine, before the sample counts as
	// acknowledged: keep it short and do not call Flush or Close from it.
	OnRejection func(s *Sample, r *Rejection)
}

// Stats counts what an Ingester did. Samples are counted one by one.
type Stats struct {
	Added    uint64 // taken by Add
	Dropped  uint64 // refused by Add under DropWhenFull
	Sent     uint64 // sent, counting each sending
	Resent   uint64 // sent again because their stream broke before the acknowledgement
	Accepted uint64 // acknowledged as stored
	Rejected uint64 // acknowledged as rejected (see IngestOptions.OnRejection)

	Queued   int // added and not yet acknowledged, sent or not
	InFlight int // sent and not yet acknowledged

	Streams   uint64 // StreamSamples streams opened
	Connected bool   // a stream is open now
	LastError error  // why the last stream ended or could not open; nil if none did
}

// Ingester streams samples to the daemon on one StreamSamples stream, in
// batches, behind a bounded queue. Every sample stays queued until the daemon
// acknowledges it, as accepted or rejected. When the stream breaks (the
// daemon restarts or crashes) or the daemon says NOT_SERVING (it is shutting
// down: the Ingester then stops sending, collects the acknowledgements of what
// it sent and closes the stream so the daemon can finish), the Ingester opens
// a new stream after a backoff (MinBackoff .. MaxBackoff) and sends again, in
// order, the samples that were not acknowledged: delivery is at least once.
// A sample the daemon stored but whose acknowledgement was lost (a crash) is
// then stored twice.
//
// An Ingester is safe for concurrent use. Make one with Client.NewIngester and
// end it with Close.
type Ingester struct {
	c   *Client
	opt IngestOptions

	mu       sync.Mutex
	pending  []*Sample // added, not sent (or to be sent again); oldest first
	resend   int       // how many at the front of pending were sent before
	inflight []*Sample // sent, not acknowledged; oldest first
	sizes    []int     // the batches inflight was sent in
	added    uint64    // samples that ever entered the queue
	acked    uint64    // samples that left it, acknowledged; the queue is FIFO
	flushing int       // Flush calls waiting: partial batches go at once
	closing  bool      // Close was called: Add refuses
	stats    Stats
	changed  chan struct{} // closed (and replaced) whenever the queue shrinks

	wake   chan struct{} // tells the sender to look again
	quit   chan struct{} // closed by Close once everything is acknowledged
	ctx    context.Context
	cancel context.CancelFunc // ends everything at once
	done   chan struct{}      // closed when the run loop returned
}

// NewIngester starts an Ingester on the client's connection. It connects in
// the background; Add never waits for the daemon unless the queue is full.
func (c *Client) NewIngester(opt IngestOptions) (*Ingester, error) {
	if opt.QueueSize == 0 {
		opt.QueueSize = DefaultQueueSize
	}
	if opt.BatchSize == 0 {
		opt.BatchSize = DefaultBatchSize
	}
	if opt.FlushInterval == 0 {
		opt.FlushInterval = DefaultFlushInterval
	}
	if opt.MaxInFlight == 0 {
		opt.MaxInFlight = DefaultMaxInFlight
	}
	switch {
	case opt.QueueSize < 0:
		return nil, fmt.Errorf("bwpred: IngestOptions.QueueSize: must be >= 1, got %d", opt.QueueSize)
	case opt.BatchSize < 0:
		return nil, fmt.Errorf("bwpred: IngestOptions.BatchSize: must be >= 1, got %d", opt.BatchSize)
	case opt.FlushInterval < 0:
		return nil, fmt.Errorf("bwpred: IngestOptions.FlushInterval: must be >= 0, got %s", opt.FlushInterval)
	case opt.MaxInFlight < 0:
		return nil, fmt.Errorf("bwpred: IngestOptions.MaxInFlight: must be >= 1, got %d", opt.MaxInFlight)
	case opt.WhenFull != BlockWhenFull && opt.WhenFull != DropWhenFull:
		return nil, fmt.Errorf("bwpred: IngestOptions.WhenFull: must be BlockWhenFull or DropWhenFull, got %d", opt.WhenFull)
	}
	ctx, cancel := context.WithCancel(context.Background())
	i := &Ingester{
		c:       c,
		opt:     opt,
		changed: make(chan struct{}),
		wake:    make(chan struct{}, 1),
		quit:    make(chan struct{}),
		ctx:     ctx,
		cancel:  cancel,
		done:    make(chan struct{}),
	}
	go i.run()
	return i, nil
}

// Add queues samples for the daemon, all or none. A sample without a
// Timestamp is stamped with the time of the call, so that a sample sent again
// after a reconnect keeps the time it was measured. Add takes ownership of the
// samples: do not change them afterwards. When the queue has no room, Add
// waits (BlockWhenFull; it returns an error wrapping ctx.Err() if ctx ends
// first, and nothing is queued) or returns ErrQueueFull (DropWhenFull).
// Adding more samples at once than IngestOptions.QueueSize is an error.
func (i *Ingester) Add(ctx context.Context, samples ...*Sample) error {
	n := len(samples)
	if n == 0 {
		return nil
	}
	if n > i.opt.QueueSize {
		return fmt.Errorf("bwpred: Add of %d samples: more than IngestOptions.QueueSize (%d)", n, i.opt.QueueSize)
	}
	now := timestamppb.Now()
	for k, s := range samples {
		if s == nil {
			return fmt.Errorf("bwpred: Add: sample %d is nil", k)
		}
		if s.Timestamp == nil {
			s.Timestamp = now
		}
	}
	i.mu.Lock()
	for {
		if i.closing {
			i.mu.Unlock()
			return ErrClosed
		}
		if len(i.pending)+len(i.inflight)+n <= i.opt.QueueSize {
			break
		}
		if i.opt.WhenFull == DropWhenFull {
			i.stats.Dropped += uint64(n)
			i.mu.Unlock()
			return ErrQueueFull
		}
		changed := i.changed
		i.mu.Unlock()
		select {
		case <-changed:
		case <-i.done:
			return ErrClosed
		case <-ctx.Done():
			return fmt.Errorf("bwpred: Add: queue full (%d samples): %w", i.opt.QueueSize, ctx.Err())
		}
		i.mu.Lock()
	}
	i.pending = append(i.pending, samples...)
	i.added += uint64(n)
	i.stats.Added += uint64(n)
	i.mu.Unlock()
	i.poke()
	return nil
}

// Flush waits until every sample added before the call is acknowledged, or
// ctx ends (an error wrapping ctx.Err(), saying how many are left). Batches
// that are not full are sent at once while a Flush waits.
func (i *Ingester) Flush(ctx context.Context) error {
	i.mu.Lock()
	target := i.added
	i.flushing++
	defer func() {
		i.mu.Lock()
		i.flushing--
		i.mu.Unlock()
	}()
	for i.acked < target {
		changed := i.changed
		left := target - i.acked
		i.mu.Unlock()
		i.poke()
		select {
		case <-changed:
		case <-i.done:
			return fmt.Errorf("bwpred: Flush: %d samples not acknowledged: %w", left, ErrClosed)
		case <-ctx.Done():
			return fmt.Errorf("bwpred: Flush: %d samples not acknowledged: %w", left, ctx.Err())
		}
		i.mu.Lock()
	}
	i.mu.Unlock()
	return nil
}

// Close stops taking samples, waits until the queued ones are acknowledged
// (as Flush), closes the stream and stops the Ingester. If ctx ends first,
// Close stops at once and returns an error saying how many samples were not
// acknowledged. Close does not close the Client.
func (i *Ingester) Close(ctx context.Context) error {
	i.mu.Lock()
	if i.closing {
		i.mu.Unlock()
		<-i.done
		return ErrClosed
	}
	i.closing = true
	i.mu.Unlock()
	err := i.Flush(ctx)
	if err == nil {
		close(i.quit) // the session closes its stream cleanly
		select {
		case <-i.done:
		case <-ctx.Done():
		}
	}
	i.cancel()
	<-i.done
	return err
}

// Stats returns the Ingester's counters now.
func (i *Ingester) Stats() Stats {
	i.mu.Lock()
	defer i.mu.Unlock()
	s := i.stats
	s.Queued = len(i.pending) + len(i.inflight)
	s.InFlight = len(i.inflight)
	return s
}

// poke wakes the sender without blocking.
func (i *Ingester) poke() {
	select {
	case i.wake <- struct{}{}:
	default:
	}
}

// run keeps one session (one stream) going until the Ingester is closed.
func (i *Ingester) run() {
	defer close(i.done)
	delay := MinBackoff
	for {
		progressed, err := i.session()
		i.requeue()
		select {
		case <-i.quit:
			return
		case <-i.ctx.Done():
			return
		default:
		}
		i.mu.Lock()
		i.stats.LastError = err
		i.mu.Unlock()
		if progressed {
			delay = MinBackoff
		}
		// Jitter (0.8 .. 1.2) keeps the workers of a node from reconnecting
		// in step after a daemon restart.
		wait := time.Duration(float64(delay) * (0.8 + 0.4*rand.Float64()))
		select {
		case <-time.After(wait):
		case <-i.quit:
			return
		case <-i.ctx.Done():
			return
		}
		if delay *= 2; delay > MaxBackoff {
			delay = MaxBackoff
		}
	}
}

// errNotServing ends a session whose daemon said NOT_SERVING.
var errNotServing = errors.New("bwpred: daemon NOT_SERVING (shutting down)")

// session opens one stream and sends on it until it breaks, the daemon goes
// NOT_SERVING, or the Ingester closes. progressed says whether any batch was
// acknowledged on it.
func (i *Ingester) session() (progressed bool, err error) {
	select {
	case <-i.quit:
		return false, nil
	default:
	}
	ctx, cancel := context.WithCancel(i.ctx)
	defer cancel()
	// Try the connection now rather than at grpc's own reconnect time: this
	// loop's backoff is the one schedule.
	i.c.conn.ResetConnectBackoff()
	hctx, hcancel := context.WithTimeout(ctx, healthTimeout)
	resp, err := i.c.health.Check(hctx, &healthpb.HealthCheckRequest{Service: ServiceName})
	hcancel()
	if err != nil {
		return false, err
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return false, fmt.Errorf("bwpred: daemon says %s", resp.Status)
	}
	stream, err := i.c.api.StreamSamples(ctx)
	if err != nil {
		return false, err
	}
	i.mu.Lock()
	i.stats.Streams++
	i.stats.Connected = true
	startAcked := i.acked
	i.mu.Unlock()
	defer func() {
		i.mu.Lock()
		i.stats.Connected = false
		progressed = i.acked > startAcked
		i.mu.Unlock()
	}()

	notServing := make(chan struct{})
	go i.watchHealth(ctx, notServing)
	recvEnded := make(chan struct{})
	var recvErr error // set before recvEnded is closed
	go func() {
		recvErr = i.receive(stream)
		close(recvEnded)
	}()
	defer func() {
		cancel()
		<-recvEnded // requeue needs the receiver gone
	}()

	var linger *time.Timer
	var lingerC <-chan time.Time
	defer func() {
		if linger != nil {
			linger.Stop()
		}
	}()
	lingered := false
	for {
		batch, resent, wait := i.take(lingered)
		if batch != nil {
			if linger != nil {
				linger.Stop()
				linger, lingerC = nil, nil
			}
			lingered = false
			if err := stream.Send(&StreamSamplesRequest{Samples: batch}); err != nil {
				<-recvEnded // the reason comes from the receiving side
				return false, streamEnded(recvErr)
			}
			i.mu.Lock()
			i.stats.Sent += uint64(len(batch))
			i.stats.Resent += uint64(resent)
			i.mu.Unlock()
			continue
		}
		if wait && linger == nil {
			linger = time.NewTimer(i.opt.FlushInterval)
			lingerC = linger.C
		}
		select {
		case <-i.wake:
		case <-lingerC:
			linger, lingerC = nil, nil
			lingered = true
		case <-recvEnded:
			return false, streamEnded(recvErr)
		case <-notServing:
			return false, i.finish(stream, recvEnded, &recvErr, errNotServing)
		case <-i.quit:
			return false, i.finish(stream, recvEnded, &recvErr, nil)
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
}

// streamEnded turns the end of the receiving side into the session's error.
func streamEnded(err error) error {
	if err == io.EOF {
		return errors.New("bwpred: daemon ended the stream")
	}
	return err
}

// finish stops sending, waits for the acknowledgements of what was sent and
// closes the stream, so that a daemon shutting down is not kept waiting; it
// returns why (or why the stream broke first).
func (i *Ingester) finish(stream BandwidthPredictorService_StreamSamplesClient,
	recvEnded chan struct{}, recvErr *error, why error) error {
	for {
		i.mu.Lock()
		empty := len(i.inflight) == 0
		changed := i.changed
		i.mu.Unlock()
		if empty {
			break
		}
		select {
		case <-changed:
		case <-recvEnded:
			return streamEnded(*recvErr)
		case <-i.ctx.Done():
			return i.ctx.Err()
		}
	}
	_ = stream.CloseSend()
	select {
	case <-recvEnded:
	case <-i.ctx.Done():
		return i.ctx.Err()
	}
	if *recvErr != io.EOF {
		return *recvErr
	}
	return why
}

// take returns the next batch to send, or nil and whether a partial batch is
// waiting for more samples (the caller then lingers). lingered says the
// partial batch has waited FlushInterval.
func (i *Ingester) take(lingered bool) (batch []*Sample, resent int, wait bool) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if len(i.pending) == 0 || len(i.sizes) >= i.opt.MaxInFlight {
		return nil, 0, false
	}
	if len(i.pending) < i.opt.BatchSize && !lingered && i.flushing == 0 && i.opt.FlushInterval > 0 {
		return nil, 0, true
	}
	n := len(i.pending)
	if n > i.opt.BatchSize {
		n = i.opt.BatchSize
	}
	batch = make([]*Sample, n)
	copy(batch, i.pending)
	i.pending = i.pending[n:]
	if len(i.pending) == 0 {
		i.pending = nil // let the backing array go
	}
	resent = n
	if i.resend < n {
		resent = i.resend
	}
	i.resend -= resent
	i.inflight = append(i.inflight, batch...)
	i.sizes = append(i.sizes, n)
	return batch, resent, false
}

// receive reads acknowledgements, one per batch in the order sent.
func (i *Ingester) receive(stream BandwidthPredictorService_StreamSamplesClient) error {
	for {
		ack, err := stream.Recv()
		if err != nil {
			return err
		}
		i.mu.Lock()
		if len(i.sizes) == 0 {
			i.mu.Unlock()
			return errors.New("bwpred: acknowledgement of a batch that was not sent")
		}
		n := i.sizes[0]
		batch := i.inflight[:n:n] // stable: only this goroutine removes from inflight
		i.mu.Unlock()
		if i.opt.OnRejection != nil {
			for _, r := range ack.Rejections {
				if int(r.Index) < n {
					i.opt.OnRejection(batch[r.Index], r)
				}
			}
		}
		i.mu.Lock()
		i.inflight = i.inflight[n:]
		i.sizes = i.sizes[1:]
		if len(i.inflight) == 0 {
			i.inflight, i.sizes = nil, nil
		}
		i.acked += uint64(n)
		i.stats.Accepted += uint64(ack.Accepted)
		i.stats.Rejected += uint64(ack.Rejected)
		close(i.changed)
		i.changed = make(chan struct{})
		i.mu.Unlock()
		i.poke()
	}
}

// requeue puts what was sent and not acknowledged back at the front of the
// queue, in order, to be sent again on the next stream.
func (i *Ingester) requeue() {
	i.mu.Lock()
	defer i.mu.Unlock()
	if len(i.inflight) == 0 {
		return
	}
	i.pending = append(append(make([]*Sample, 0, len(i.inflight)+len(i.pending)), i.inflight...), i.pending...)
	i.resend += len(i.inflight)
	i.inflight, i.sizes = nil, nil
}

// watchHealth closes notServing when the daemon stops serving (it is shutting
// down), and then ends its own call at once: an open Health/Watch call would
// hold the daemon's drain.
func (i *Ingester) watchHealth(ctx context.Context, notServing chan struct{}) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := i.c.health.Watch(ctx, &healthpb.HealthCheckRequest{Service: ServiceName})
	if err != nil {
		return
	}
	for {
		resp, err := w.Recv()
		if err != nil {
			return // a daemon without Watch, or the connection broke (the stream says so)
		}
		if resp.Status != healthpb.HealthCheckResponse_SERVING {
			close(notServing)
			return
		}
	}
}
