package bwpred_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	bwpred "github.com/novacron/bwpredd/clients/go"
)

// TestDefaultTargetIsBwpredctls: DefaultTarget follows the rule of the
// Python side (bwpredd.config.default_listen, which bwpredctl uses) for each
// environment it reads.
func TestDefaultTargetIsBwpredctls(t *testing.T) {
	for _, env := range []map[string]string{
		{"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": ""},
		{"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": "/run/user/1000"},
		{"RUNTIME_DIRECTORY": "/run/bwpredd:/run/other", "XDG_RUNTIME_DIR": "/x"},
		{"RUNTIME_DIRECTORY": "/srv/rt/", "XDG_RUNTIME_DIR": ""},
	} {
		for k, v := range env {
			t.Setenv(k, v)
		}
		cmd := exec.Command(python, "-c", "from bwpredd.config import default_listen; print(default_listen())")
		cmd.Dir = repoRoot
		out, err := cmd.Output()
		if err != nil {
			t.Fatal(err)
		}
		if want := strings.TrimSpace(string(out)); bwpred.DefaultTarget() != want {
			t.Errorf("env %v: DefaultTarget() = %q, bwpredctl's is %q", env, bwpred.DefaultTarget(), want)
		}
	}
}

// TestServiceName: the constant is the service's name in the generated code.
func TestServiceName(t *testing.T) {
	got := string(bwpred.File_bwpred_v1_bwpred_proto.Services().Get(0).FullName())
	if got != bwpred.ServiceName {
		t.Errorf("ServiceName %q, the proto says %q", bwpred.ServiceName, got)
	}
}

// TestDialRefusesBadTargets names the rule.
func TestDialRefusesBadTargets(t *testing.T) {
	for _, target := range []string{"unix:relative.sock", "no-port", "unix:"} {
		if _, err := bwpred.Dial(context.Background(), target); err == nil {
			t.Errorf("Dial(%q) succeeded, want an error", target)
		}
	}
	if _, err := bwpred.Dial(context.Background(), "", bwpred.WithTimeout(0)); err == nil ||
		!strings.Contains(err.Error(), "WithTimeout") {
		t.Errorf("WithTimeout(0): %v, want an error naming it", err)
	}
}

// push stores 12 samples, one second apart, for each peer (bandwidth around
// base Mbit/s) through PushSamples.
func push(t *testing.T, c *bwpred.Client, peers map[string]float64) {
	t.Helper()
	req := &bwpred.PushSamplesRequest{}
	start := time.Now().Add(-12 * time.Second)
	for peer, base := range peers {
		for i := 0; i < 12; i++ {
			s := bwpred.NewSample(peer, base*(1+0.01*float64(i%3)))
			s.LatencyMs = proto.Float64(2)
			s.PacketLoss = proto.Float64(0)
			s.Reliability = proto.Float64(1)
			s.Timestamp = timestamppb.New(start.Add(time.Duration(i) * time.Second))
			req.Samples = append(req.Samples, s)
		}
	}
	resp, err := c.API().PushSamples(ctxFor(t, 10*time.Second), req)
	if err != nil || int(resp.Accepted) != len(req.Samples) {
		t.Fatalf("push: %v %v", resp, err)
	}
}

// TestAnswers: Forecast, Allocate, Advise and RankPeers answer from the
// model for peers with full windows; bad requests are InvalidArgument naming
// the field, an unknown peer NotFound.
func TestAnswers(t *testing.T) {
	d := newDaemon(t).start()
	c := d.dial()
	push(t, c, map[string]float64{"node-a": 900, "node-b": 40})
	ctx := ctxFor(t, 30*time.Second)
	if _, err := c.API().PushSamples(ctx, &bwpred.PushSamplesRequest{
		Samples: []*bwpred.Sample{bwpred.NewSample("node-new", 10)},
	}); err != nil {
		t.Fatal(err)
	}

	fc, err := c.Forecast(ctx, "node-b", "node-a", "node-new")
	if err != nil {
		t.Fatal(err)
	}
	if len(fc) != 3 || fc[0].PeerId != "node-b" || fc[1].PeerId != "node-a" || fc[2].PeerId != "node-new" {
		t.Fatalf("forecasts not in request order: %v", fc)
	}
	for _, f := range fc[:2] {
		if f.Source != bwpred.ForecastSource_FORECAST_SOURCE_MODEL || f.ModelVersion != "test-1" ||
			f.SamplesInWindow != 10 || !(f.LowMbps <= f.BandwidthMbps && f.BandwidthMbps <= f.HighMbps) ||
			f.BandwidthMbps <= 0 {
			t.Errorf("forecast %v: want the model's, 10 samples, low <= point <= high", f)
		}
	}
	if fc[2].Source != bwpred.ForecastSource_FORECAST_SOURCE_BASELINE_COLD_START || fc[2].SamplesInWindow != 1 {
		t.Errorf("peer with one sample: %v, want a cold-start baseline", fc[2])
	}

	over, err := c.ForecastOver(ctx, 30, "node-a", "node-new")
	if err != nil {
		t.Fatal(err)
	}
	// The test model declares no horizons: the next-step forecast stands in.
	if len(over) != 2 || over[0].PeerId != "node-a" || over[0].HorizonSeconds != 0 ||
		over[0].BandwidthMbps != fc[1].BandwidthMbps || over[1].HorizonSeconds != 0 {
		t.Errorf("ForecastOver(30) without horizons: %v, want the next-step forecasts, horizon 0", over)
	}
	if _, err := c.ForecastOver(ctx, -1, "node-a"); status.Code(err) != codes.InvalidArgument ||
		!strings.Contains(status.Convert(err).Message(), "horizon_seconds") {
		t.Errorf("ForecastOver(-1): %v, want InvalidArgument naming horizon_seconds", err)
	}

	al, err := c.Allocate(ctx, "node-a", "node-b")
	if err != nil {
		t.Fatal(err)
	}
	for k, a := range al {
		if a.PeerId != []string{"node-a", "node-b"}[k] || a.Action > 9 ||
			a.AllocationPercent != (a.Action+1)*10 || a.Source != bwpred.ForecastSource_FORECAST_SOURCE_MODEL ||
			a.ReferenceCapacityMbps <= 0 {
			t.Errorf("allocation %v", a)
		}
	}

	adv, err := c.Advise(ctx, &bwpred.AdviseRequest{
		PeerId: "node-a", PayloadBytes: 1 << 30, DataKind: bwpred.DataKind_DATA_KIND_MEMORY,
	})
	if err != nil {
		t.Fatal(err)
	}
	if adv.PayloadBytes != 1<<30 || adv.Forecast.GetPeerId() != "node-a" || adv.TransferSeconds <= 0 ||
		adv.ParallelStreams < 1 || adv.SocketBufferBytes == 0 || adv.Compression == nil {
		t.Errorf("advice %v", adv)
	}

	ranked, err := c.RankPeers(ctx, &bwpred.RankPeersRequest{
		PeerIds: []string{"node-b", "node-a"}, PayloadBytes: 1 << 30,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(ranked) != 2 || !sort.SliceIsSorted(ranked, func(i, j int) bool {
		return ranked[i].TransferSeconds < ranked[j].TransferSeconds
	}) {
		t.Errorf("ranking %v: want both peers, fastest first", ranked)
	}

	_, err = c.Forecast(ctx, "node-a", "bad id!")
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "peer_ids[1]") {
		t.Errorf("bad peer id: %v, want InvalidArgument naming peer_ids[1]", err)
	}
	if _, err := c.GetPeer(ctx, "nobody"); status.Code(err) != codes.NotFound {
		t.Errorf("GetPeer of an unknown peer: %v, want NotFound", err)
	}
	if _, err := c.Forecast(ctx, "nobody"); status.Code(err) != codes.NotFound {
		t.Errorf("Forecast of an unknown peer: %v, want NotFound", err)
	}
}

// TestDeadlines: a call to a daemon that does not answer ends at the
// context's deadline, or at the client's timeout when the context has none.
func TestDeadlines(t *testing.T) {
	d := newDaemon(t).start()
	c := d.dial(bwpred.WithTimeout(300 * time.Millisecond))
	push(t, c, map[string]float64{"node-a": 100})
	d.signal(syscall.SIGSTOP) // the cleanup's kill continues it first
	waitStopped(t, d.pid())

	if _, err := c.Forecast(ctxFor(t, 200*time.Millisecond), "node-a"); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("Forecast with a 200 ms context: %v, want DeadlineExceeded", err)
	}
	bg := context.Background()
	calls := map[string]func() error{
		"Forecast": func() error { _, err := c.Forecast(bg, "node-a"); return err },
		"Allocate": func() error { _, err := c.Allocate(bg, "node-a"); return err },
		"Advise": func() error {
			_, err := c.Advise(bg, &bwpred.AdviseRequest{PeerId: "node-a", PayloadBytes: 1})
			return err
		},
		"RankPeers": func() error {
			_, err := c.RankPeers(bg, &bwpred.RankPeersRequest{PeerIds: []string{"node-a"}, PayloadBytes: 1})
			return err
		},
		"GetPeer": func() error { _, err := c.GetPeer(bg, "node-a"); return err },
		"Health":  func() error { _, err := c.Health(bg); return err },
	}
	for name, call := range calls {
		if err := call(); status.Code(err) != codes.DeadlineExceeded {
			t.Errorf("%s without a deadline: %v, want DeadlineExceeded (the client's timeout)", name, err)
		}
	}
	if err := c.WaitReady(ctxFor(t, 300*time.Millisecond)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitReady on a stopped daemon: %v, want the context's deadline", err)
	}
	d.signal(syscall.SIGCONT)
	if fc, err := c.Forecast(ctxFor(t, 10*time.Second), "node-a"); err != nil || len(fc) != 1 {
		t.Errorf("after SIGCONT: %v %v", fc, err)
	}
}

// TestTLS: WithTLS talks to a daemon on TCP with TLS (and mutual TLS); a
// plaintext client or one trusting another CA is refused.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCert(t, nil, nil, "bwpred test CA", true)
	serverCert, serverKey := newCert(t, ca, caKey, "localhost", false)
	clientCert, clientKey := newCert(t, ca, caKey, "worker", false)
	other, _ := newCert(t, nil, nil, "another CA", true)
	write := func(name string, der []byte, kind string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	keyDER := func(k *ecdsa.PrivateKey) []byte {
		b, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	settings := []string{
		"LISTEN=127.0.0.1:0",
		"TLS_CERT=" + write("server.pem", serverCert.Raw, "CERTIFICATE"),
		"TLS_KEY=" + write("server.key", keyDER(serverKey), "EC PRIVATE KEY"),
	}
	trust := x509.NewCertPool()
	trust.AddCert(ca)
	clientPair := tls.Certificate{Certificate: [][]byte{clientCert.Raw}, PrivateKey: clientKey}

	t.Run("tls", func(t *testing.T) {
		d := newDaemon(t, settings...).start()
		if !strings.HasPrefix(d.target, "127.0.0.1:") {
			t.Fatalf("daemon listens on %q", d.target)
		}
		c := d.dial(bwpred.WithTLS(&tls.Config{RootCAs: trust}))
		ing := newIngester(t, c, bwpred.IngestOptions{})
		p := newPlan(1, 10)
		add(t, ing, p.samples)
		flush(t, ing)
		p.checkWindows(t, c, 10)

		plain := dialTo(t, d.target)
		if _, err := plain.Forecast(ctxFor(t, 5*time.Second), "node-000"); status.Code(err) != codes.Unavailable {
			t.Errorf("plaintext client: %v, want Unavailable", err)
		}
		otherPool := x509.NewCertPool()
		otherPool.AddCert(other)
		wrong := dialTo(t, d.target, bwpred.WithTLS(&tls.Config{RootCAs: otherPool}))
		if _, err := wrong.Forecast(ctxFor(t, 5*time.Second), "node-000"); status.Code(err) != codes.Unavailable {
			t.Errorf("client trusting another CA: %v, want Unavailable", err)
		}
	})
	t.Run("mtls", func(t *testing.T) {
		d := newDaemon(t, append(settings,
			"TLS_CLIENT_CA="+write("ca.pem", ca.Raw, "CERTIFICATE"), "REQUIRE_CLIENT_AUTH=true")...).start()
		c := d.dial(bwpred.WithTLS(&tls.Config{RootCAs: trust, Certificates: []tls.Certificate{clientPair}}))
		if st, err := c.Health(ctxFor(t, 10*time.Second)); err != nil || st.String() != "SERVING" {
			t.Fatalf("mTLS client: %v %v", st, err)
		}
		anon := dialTo(t, d.target, bwpred.WithTLS(&tls.Config{RootCAs: trust}))
		if _, err := anon.Health(ctxFor(t, 5*time.Second)); status.Code(err) != codes.Unavailable {
			t.Errorf("client without a certificate: %v, want Unavailable", err)
		}
	})
}

// newCert makes a certificate signed by parent (self-signed when nil) for
// localhost and 127.0.0.1.
func newCert(t *testing.T, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, cn string, isCA bool) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  isCA,
	}
	if isCA {
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	} else {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}
