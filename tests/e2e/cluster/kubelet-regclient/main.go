// kubelet v1.34.4's plugin registration client, as pkg/kubelet/pluginmanager/operationexecutor
// does it (dial with WithBlock and a unix dialer, GetInfo with a 1 s deadline, then
// NotifyRegistrationStatus): checks `csi-spdk registrar` against kubelet's own API code.
// Usage: go build -o regclient . && ./regclient <dir>/csi-spdk.io-reg.sock [refuse]
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

func main() {
	path := os.Args[1]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := grpc.DialContext(ctx, path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	)
	if err != nil {
		fmt.Println("dial:", err)
		os.Exit(2)
	}
	client := registerapi.NewRegistrationClient(c)
	ctx2, cancel2 := context.WithTimeout(context.Background(), time.Second)
	defer cancel2()
	t0 := time.Now()
	info, err := client.GetInfo(ctx2, &registerapi.InfoRequest{})
	if err != nil {
		fmt.Println("GetInfo:", err)
		os.Exit(3)
	}
	fmt.Printf("GetInfo %v: %+v\n", time.Since(t0), info)
	_, err = client.NotifyRegistrationStatus(context.Background(), &registerapi.RegistrationStatus{PluginRegistered: len(os.Args) < 3, Error: "test"})
	fmt.Println("Notify:", err)
}
