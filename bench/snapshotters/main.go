// The snapshotter benchmark's driver (not a test): the same calls, in the
// same order, against one snapshotter, each the way containerd itself holds
// it: dmd-snapshotter through containerd's gRPC proxy client (as containerd
// calls a proxy plugin), containerd's devmapper snapshotter and its
// overlayfs snapshotter in this process (as they live in containerd's).
// Built offline from Debian's containerd sources by bench/snapshotters/build;
// run in the lab by bench/snapshotters/compare.py, which prints the ratios.
//
//	snapshotters-bench -kind dmd -socket PATH -root DIR -n 30
//	snapshotters-bench -kind devmapper -pool NAME -root DIR -n 30
//	snapshotters-bench -kind overlayfs -root DIR -n 30
//
// Prints one JSON object: per operation, every call's seconds.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/devmapper"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
)

var (
	kind   = flag.String("kind", "dmd", "dmd, devmapper or overlayfs")
	socket = flag.String("socket", "", "dmd-snapshotter's socket (-kind dmd)")
	pool   = flag.String("pool", "", "an existing thin-pool device's name (-kind devmapper)")
	root   = flag.String("root", "", "a directory of the snapshotter's (and for mounts)")
	n      = flag.Int("n", 30, "rounds")
)

func open(ctx context.Context) (snapshots.Snapshotter, error) {
	switch *kind {
	case "dmd":
		conn, err := grpc.DialContext(ctx, *socket, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithContextDialer(func(ctx context.Context, path string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", path)
			}))
		if err != nil {
			return nil, err
		}
		return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "dmd"), nil
	case "devmapper":
		// containerd's defaults but the base: 10 GiB like dmd-snapshotter's.
		return devmapper.NewSnapshotter(ctx, &devmapper.Config{
			RootPath: filepath.Join(*root, "devmapper"), PoolName: *pool,
			BaseImageSize: "10GiB"})
	case "overlayfs":
		return overlay.NewSnapshotter(filepath.Join(*root, "overlayfs"))
	}
	return nil, fmt.Errorf("no snapshotter kind %q", *kind)
}

// layer writes one file into a fresh snapshot, as an unpack does.
func layer(mounts []mount.Mount, name string) error {
	return mount.WithTempMount(context.Background(), mounts, func(dir string) error {
		return os.WriteFile(filepath.Join(dir, name), []byte(name), 0644)
	})
}

func run() error {
	ctx := context.Background()
	s, err := open(ctx)
	if err != nil {
		return err
	}
	defer s.Close()
	times := map[string][]float64{}
	timed := func(op string, f func() error) error {
		start := time.Now()
		err := f()
		times[op] = append(times[op], time.Since(start).Seconds())
		if err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		return nil
	}
	var mounts []mount.Mount
	if err := timed("prepare-first", func() (err error) {
		mounts, err = s.Prepare(ctx, "base-tmp", "")
		return err
	}); err != nil {
		return err
	}
	if err := layer(mounts, "base"); err != nil {
		return err
	}
	if err := s.Commit(ctx, "base", "base-tmp"); err != nil {
		return err
	}
	for i := 0; i < *n; i++ {
		active, committed, view := fmt.Sprintf("a%d", i), fmt.Sprintf("c%d", i), fmt.Sprintf("v%d", i)
		if err := timed("prepare", func() (err error) {
			mounts, err = s.Prepare(ctx, active, "base")
			return err
		}); err != nil {
			return err
		}
		if err := layer(mounts, active); err != nil {
			return err
		}
		for _, step := range []struct {
			op string
			f  func() error
		}{
			{"commit", func() error { return s.Commit(ctx, committed, active) }},
			{"view", func() error { _, err := s.View(ctx, view, committed); return err }},
			{"remove-view", func() error { return s.Remove(ctx, view) }},
			{"remove", func() error { return s.Remove(ctx, committed) }},
		} {
			if err := timed(step.op, step.f); err != nil {
				return err
			}
		}
	}
	if err := s.Remove(ctx, "base"); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]interface{}{"kind": *kind, "seconds": times})
}

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "snapshotters-bench:", err)
		os.Exit(1)
	}
}
