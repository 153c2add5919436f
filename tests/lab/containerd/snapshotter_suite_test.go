// containerd's own snapshotter test suite (snapshots/testsuite: 21 tests,
// 128 layers mounted among them), run against dmd-snapshotter's socket
// through containerd's own gRPC proxy client, as containerd's daemon talks
// to a proxy plugin. Built offline from Debian's containerd sources in
// GOPATH mode by tests/lab/containerd/build; run as root in the lab by
// tests/lab/test_snapshotter_lab.py:
//
//	dmd-snapshotter-suite.test -test.root -socket PATH [-test.run ...]
//
// The suite makes a new snapshotter for each test and runs the tests in
// parallel; each gets a namespace of its own (the containerd-namespace
// header of every call), so their keys and lists never meet, the way
// containerd keeps its namespaces apart.
package dmdsuite

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

var socket = flag.String("socket", "/run/dmd-snapshotter/snapshotter.sock",
	"dmd-snapshotter's unix socket")

var made int64

// namespaced gives every call the namespace of its own test.
type namespaced struct {
	s  snapshots.Snapshotter
	ns string
}

func (n namespaced) in(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, n.ns)
}

func (n namespaced) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	return n.s.Stat(n.in(ctx), key)
}

func (n namespaced) Update(ctx context.Context, info snapshots.Info, paths ...string) (snapshots.Info, error) {
	return n.s.Update(n.in(ctx), info, paths...)
}

func (n namespaced) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	return n.s.Usage(n.in(ctx), key)
}

func (n namespaced) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	return n.s.Mounts(n.in(ctx), key)
}

func (n namespaced) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return n.s.Prepare(n.in(ctx), key, parent, opts...)
}

func (n namespaced) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return n.s.View(n.in(ctx), key, parent, opts...)
}

func (n namespaced) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return n.s.Commit(n.in(ctx), name, key, opts...)
}

func (n namespaced) Remove(ctx context.Context, key string) error {
	return n.s.Remove(n.in(ctx), key)
}

func (n namespaced) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return n.s.Walk(n.in(ctx), fn, filters...)
}

func (n namespaced) Close() error { return n.s.Close() }

func dial() (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return grpc.DialContext(ctx, *socket, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, path string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}))
}

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	conn, err := dial()
	if err != nil {
		return nil, nil, fmt.Errorf("dial %s: %w", *socket, err)
	}
	ns := fmt.Sprintf("suite%d-%d", os.Getpid(), atomic.AddInt64(&made, 1))
	s := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "dmd")
	return namespaced{s, ns}, conn.Close, nil
}

func TestDmdSnapshotter(t *testing.T) {
	testsuite.SnapshotterSuite(t, "dmd", newSnapshotter)
}
