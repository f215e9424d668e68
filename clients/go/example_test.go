package bwpred_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"google.golang.org/protobuf/proto"

	bwpred "github.com/novacron/bwpredd/clients/go"
)

// A DWCP worker streams what it measures about its peer links and asks for
// forecasts, allocation levels and transfer advice.
func Example() {
	ctx := context.Background()
	c, err := bwpred.Dial(ctx, "") // the default socket, as bwpredctl
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ing, err := c.NewIngester(bwpred.IngestOptions{
		WhenFull: bwpred.DropWhenFull, // never stall the transfer path
		OnRejection: func(s *bwpred.Sample, r *bwpred.Rejection) {
			log.Printf("sample for %s rejected: %s", s.PeerId, r.Reason)
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer ing.Close(ctx)

	s := bwpred.NewSample("node-b", 940)
	s.LatencyMs = proto.Float64(0.4)
	if err := ing.Add(ctx, s); err != nil {
		log.Print(err) // ErrQueueFull: the daemon has been away for long
	}

	fctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	fc, err := c.Forecast(fctx, "node-b")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%.0f Mbit/s (%.0f .. %.0f)\n", fc[0].BandwidthMbps, fc[0].LowMbps, fc[0].HighMbps)

	adv, err := c.Advise(ctx, &bwpred.AdviseRequest{
		PeerId: "node-b", PayloadBytes: 8 << 30, DataKind: bwpred.DataKind_DATA_KIND_MEMORY,
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(adv.ParallelStreams, "streams,", adv.Compression.Codec, adv.TransferSeconds, "s")
}
