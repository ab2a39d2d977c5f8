package samplingpb_test

import (
	"reflect"
	"testing"

	"github.com/tpfleet/tpfleet/internal/samplingpb"
	"github.com/tpfleet/tpfleet/sample"
)

// TestRoundTrip: every field of sample.Params survives ToProto then FromProto.
func TestRoundTrip(t *testing.T) {
	for _, p := range []sample.Params{
		{},
		{Temperature: 0.7, TopK: 40, TopP: 0.9, Seed: 12},
		{MinTokens: 3, MinStopIDs: []int{2, 3}, LogitBias: map[int]float64{5: -100, 7: 2.5}, RepetitionPenalty: 1.1,
			FrequencyPenalty: 0.5, PresencePenalty: -0.5, Logprobs: true, TopLogprobs: 20},
	} {
		if got := samplingpb.FromProto(samplingpb.ToProto(p)); !reflect.DeepEqual(got, p) {
			t.Errorf("FromProto(ToProto(%+v)) = %+v", p, got)
		}
	}
	if got := samplingpb.FromProto(nil); !reflect.DeepEqual(got, sample.Params{}) {
		t.Errorf("FromProto(nil) = %+v, want the zero Params", got)
	}
}
