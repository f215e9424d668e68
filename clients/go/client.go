package bwpred

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// ServiceName is the full name of the API's service; the daemon reports its
// health under this name (and under "").
const ServiceName = "bwpred.v1.BandwidthPredictorService"

// DefaultTimeout is the deadline a call gets when its context has none; the
// same as bwpredctl's --timeout.
const DefaultTimeout = 10 * time.Second

// Reconnect backoff, for the connection and for the ingest stream: the first
// retry after MinBackoff, each next one twice as late (with jitter), at most
// MaxBackoff apart.
const (
	MinBackoff = 100 * time.Millisecond
	MaxBackoff = 5 * time.Second
)

// maxRecvBytes matches the Python client: a Forecast of 10,000 peers fits.
const maxRecvBytes = 64 << 20

// DefaultTarget is where the daemon listens and bwpredctl connects when no
// address is given: "unix:" and, under systemd, $RUNTIME_DIRECTORY/bwpredd.sock
// (its first entry); as root /run/bwpredd/bwpredd.sock; otherwise
// $XDG_RUNTIME_DIR/bwpredd/bwpredd.sock, falling back to
// /tmp/bwpredd-<uid>/bwpredd.sock. Like bwpredctl, it does not read
// BWPREDD_LISTEN: pass that address to Dial when the daemon was moved.
func DefaultTarget() string {
	var base string
	switch {
	case os.Getenv("RUNTIME_DIRECTORY") != "":
		base = strings.SplitN(os.Getenv("RUNTIME_DIRECTORY"), ":", 2)[0]
	case os.Geteuid() == 0:
		base = "/run/bwpredd"
	case os.Getenv("XDG_RUNTIME_DIR") != "":
		base = filepath.Join(os.Getenv("XDG_RUNTIME_DIR"), "bwpredd")
	default:
		base = fmt.Sprintf("/tmp/bwpredd-%d", os.Geteuid())
	}
	return "unix:" + filepath.Join(base, "bwpredd.sock")
}

// Option configures Dial.
type Option func(*options)

type options struct {
	tls      *tls.Config
	timeout  time.Duration
	dialOpts []grpc.DialOption
}

// WithTLS connects with TLS (a daemon listening on TCP with tls_cert and
// tls_key). Set cfg.RootCAs to the CA that signed the daemon's certificate,
// and cfg.Certificates for mutual TLS; cfg.ServerName defaults to the
// target's host.
func WithTLS(cfg *tls.Config) Option {
	return func(o *options) { o.tls = cfg }
}

// WithTimeout sets the deadline of calls whose context has none
// (DefaultTimeout otherwise).
func WithTimeout(d time.Duration) Option {
	return func(o *options) { o.timeout = d }
}

// WithDialOptions passes extra options to grpc.DialContext.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// Client is a connection to the daemon. It is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	api     BandwidthPredictorServiceClient
	health  healthpb.HealthClient
	timeout time.Duration
	target  string
}

// Dial connects to the daemon at target: "unix:/path.sock" or "host:port";
// "" means DefaultTarget(). It does not wait for the daemon (see
// Client.WaitReady): calls made while it is away fail with codes.Unavailable,
// and the connection is retried with backoff (MinBackoff .. MaxBackoff).
// Without WithTLS the connection is plaintext, which the daemon allows on
// TCP only with allow_insecure_tcp.
func Dial(ctx context.Context, target string, opts ...Option) (*Client, error) {
	o := options{timeout: DefaultTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	if o.timeout <= 0 {
		return nil, fmt.Errorf("bwpred: WithTimeout: must be > 0, got %s", o.timeout)
	}
	if target == "" {
		target = DefaultTarget()
	}
	dialOpts := []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay: MinBackoff, Multiplier: 2, Jitter: 0.2, MaxDelay: MaxBackoff,
			},
			MinConnectTimeout: 5 * time.Second,
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxRecvBytes)),
	}
	if o.tls != nil {
		dialOpts = append(dialOpts, grpc.WithTransportCredentials(credentials.NewTLS(o.tls)))
	} else {
		dialOpts = append(dialOpts, grpc.WithInsecure())
	}
	addr := target
	if strings.HasPrefix(target, "unix:") {
		// grpc-go 1.33 has no unix resolver: dial the path ourselves.
		path := strings.TrimPrefix(target, "unix:")
		if strings.HasPrefix(path, "//") { // unix:///abs/path
			path = strings.TrimPrefix(path, "//")
		}
		if !filepath.IsAbs(path) {
			return nil, fmt.Errorf("bwpred: target %q: unix socket path must be absolute", target)
		}
		dialOpts = append(dialOpts,
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			}),
			grpc.WithAuthority("localhost"))
		addr = "passthrough:///" + path
	} else if _, _, err := net.SplitHostPort(target); err != nil {
		return nil, fmt.Errorf("bwpred: target %q: expected 'unix:/path.sock' or 'host:port'", target)
	}
	conn, err := grpc.DialContext(ctx, addr, append(dialOpts, o.dialOpts...)...)
	if err != nil {
		return nil, fmt.Errorf("bwpred: dial %s: %w", target, err)
	}
	return &Client{
		conn:    conn,
		api:     NewBandwidthPredictorServiceClient(conn),
		health:  healthpb.NewHealthClient(conn),
		timeout: o.timeout,
		target:  target,
	}, nil
}

// Target is the address the client dials.
func (c *Client) Target() string { return c.target }

// API gives every RPC of the service through the generated stub.
func (c *Client) API() BandwidthPredictorServiceClient { return c.api }

// Conn is the underlying gRPC connection.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Close closes the connection. Close the client's Ingesters first.
func (c *Client) Close() error { return c.conn.Close() }

// withDeadline gives ctx the client's timeout when it has no deadline.
func (c *Client) withDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}

// Health asks the daemon whether the API is served: SERVING, or NOT_SERVING
// while it shuts down.
func (c *Client) Health(ctx context.Context) (healthpb.HealthCheckResponse_ServingStatus, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	resp, err := c.health.Check(ctx, &healthpb.HealthCheckRequest{Service: ServiceName})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN, err
	}
	return resp.Status, nil
}

// WaitReady waits until the daemon reports SERVING, or ctx ends (it then
// returns an error wrapping ctx.Err() and saying what was last seen). A ctx
// without a deadline waits as long as it takes.
func (c *Client) WaitReady(ctx context.Context) error {
	delay := MinBackoff
	var last error
	for {
		resp, err := c.health.Check(ctx,
			&healthpb.HealthCheckRequest{Service: ServiceName}, grpc.WaitForReady(true))
		switch {
		case err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING:
			return nil
		case err == nil:
			last = fmt.Errorf("daemon says %s", resp.Status)
		case ctx.Err() == nil:
			last = err
		}
		select {
		case <-ctx.Done():
			if last == nil {
				last = errors.New("no answer")
			}
			return fmt.Errorf("bwpred: %s not SERVING (%v): %w", c.target, last, ctx.Err())
		case <-time.After(delay):
		}
		if delay *= 2; delay > MaxBackoff {
			delay = MaxBackoff
		}
	}
}

// Forecast gives the next-step bandwidth forecast of each peer, in the order
// asked. A peer with fewer than 10 samples gets a baseline
// (FORECAST_SOURCE_BASELINE_COLD_START); one the daemon does not track is
// codes.NotFound.
func (c *Client) Forecast(ctx context.Context, peerIDs ...string) ([]*PeerForecast, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	resp, err := c.api.Forecast(ctx, &ForecastRequest{PeerIds: peerIDs})
	if err != nil {
		return nil, err
	}
	return resp.Forecasts, nil
}

// ForecastOver gives each peer's mean bandwidth over the next seconds, with
// its 80% interval, in the order asked: what a transfer of that duration will
// see. Under a model directory without horizons the next-step forecast
// stands in, and PeerForecast.HorizonSeconds says 0; otherwise it says the
// horizon the answer covers. seconds must be > 0 and at most 86400
// (codes.InvalidArgument naming horizon_seconds otherwise).
func (c *Client) ForecastOver(ctx context.Context, seconds float64, peerIDs ...string) ([]*PeerForecast, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	resp, err := c.api.Forecast(ctx, &ForecastRequest{PeerIds: peerIDs, HorizonSeconds: seconds})
	if err != nil {
		return nil, err
	}
	return resp.Forecasts, nil
}

// Allocate gives each peer's allocation level (10% .. 100% of its link), in
// the order asked.
func (c *Client) Allocate(ctx context.Context, peerIDs ...string) ([]*PeerAllocation, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	resp, err := c.api.Allocate(ctx, &AllocateRequest{PeerIds: peerIDs})
	if err != nil {
		return nil, err
	}
	return resp.Allocations, nil
}

// Advise gives transfer advice (streams, socket buffer, compression,
// transfer time, network mode) for req.PayloadBytes to req.PeerId.
func (c *Client) Advise(ctx context.Context, req *AdviseRequest) (*Advice, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	resp, err := c.api.Advise(ctx, req)
	if err != nil {
		return nil, err
	}
	return resp.Advice, nil
}

// RankPeers orders req.PeerIds by the estimated time to move
// req.PayloadBytes, fastest first, with the advice for each.
func (c *Client) RankPeers(ctx context.Context, req *RankPeersRequest) ([]*Advice, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	resp, err := c.api.RankPeers(ctx, req)
	if err != nil {
		return nil, err
	}
	return resp.Advice, nil
}

// GetPeer gives what the daemon holds of one peer: its window (oldest
// first), counts and live accuracy. An unknown peer is codes.NotFound.
func (c *Client) GetPeer(ctx context.Context, peerID string) (*Peer, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	resp, err := c.api.GetPeer(ctx, &GetPeerRequest{PeerId: peerID})
	if err != nil {
		return nil, err
	}
	return resp.Peer, nil
}

// NewSample is a sample of one peer link's bandwidth, measured now by the
// daemon's clock (or by Ingester.Add's, which stamps it). Set LatencyMs,
// PacketLoss and Reliability with proto.Float64 when measured: absent ones
// are carried forward from the peer's previous sample.
func NewSample(peerID string, bandwidthMbps float64) *Sample {
	return &Sample{PeerId: peerID, BandwidthMbps: &bandwidthMbps}
}
