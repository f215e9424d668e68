// Package bwpred is the Go client of bwpredd, the per-peer bandwidth
// forecasting sidecar of the DWCP mesh.
//
// The package holds the generated messages and stubs of the bwpred.v1 API
// (bwpred.pb.go and bwpred_grpc.pb.go, made by `make go-gen` from
// proto/bwpred/v1/bwpred.proto; never edit them) and a small client on top:
//
//   - Dial connects to the daemon; an empty target means DefaultTarget, the
//     socket bwpredctl uses.
//   - Client.NewIngester streams samples on one StreamSamples stream, in
//     batches, behind a bounded queue. A sample stays queued until the daemon
//     acknowledges it; a stream that breaks (the daemon restarts, crashes or
//     goes NOT_SERVING) is opened again with backoff and the unacknowledged
//     samples are sent again (at least once). Rejected samples are reported to
//     IngestOptions.OnRejection and counted in Stats.
//   - Client.Forecast, Client.Allocate, Client.Advise, Client.RankPeers and
//     Client.GetPeer are thin wrappers with a deadline: the context's, else
//     the client's timeout (WithTimeout). Client.API gives every RPC.
//
// Every call takes a context.Context. Errors are gRPC status errors
// (status.Code(err) gives the code): codes.InvalidArgument names the field and
// the rule, codes.NotFound is a peer the daemon does not track,
// codes.Unavailable means the daemon is not reachable or is shutting down,
// codes.DeadlineExceeded means the deadline passed.
//
// An Ingester holds no keepalive: a daemon that hangs without closing its
// socket stops the acknowledgements, the queue fills and Add applies its
// FullPolicy.
package bwpred
