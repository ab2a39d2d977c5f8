// Package deploy holds tpfleet's deployment files and their tests: the container image (Dockerfile), the
// Helm chart (helm/tpfleet, with example value sets in helm/examples) and the Grafana dashboard
// (grafana/). It is a Go module of its own, so that the Kubernetes API types its tests decode the
// rendered manifests into (k8s.io/api, a large tree) stay out of tpfleet's module and its race-enabled
// test run.
//
// The tests need helm (make helm installs the pinned version into bin/) and build the tpfleet binary
// from the repository the way the Dockerfile does:
//
//   - TestDockerfile checks the image's stages and runs its go build line;
//   - TestChartLint and TestChartRender lint (--strict) and render the chart for every example value set
//     and decode every manifest strictly into the k8s.io/api types;
//   - TestChartSchema checks that values.schema.json rejects bad values, naming the field;
//   - TestChartCluster renders the CPU demo, starts each rendered container's command as a local process
//     and generates the fixture's greedy ids through the rendered Service's port.
package deploy
