// Package samplingpb converts sampling parameters between package sample and their protobuf form, the
// one conversion the coordinator (requests in, steps out) and the worker (steps in) share.
package samplingpb

import (
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

// FromProto returns the Params sp carries; nil gives the zero Params (greedy).
func FromProto(sp *pb.SamplingParams) sample.Params {
	p := sample.Params{
		Temperature:       sp.GetTemperature(),
		TopK:              int(sp.GetTopK()),
		TopP:              sp.GetTopP(),
		Seed:              sp.GetSeed(),
		MinTokens:         int(sp.GetMinTokens()),
		RepetitionPenalty: sp.GetRepetitionPenalty(),
		FrequencyPenalty:  sp.GetFrequencyPenalty(),
		PresencePenalty:   sp.GetPresencePenalty(),
		Logprobs:          sp.GetLogprobs(),
		TopLogprobs:       int(sp.GetTopLogprobs()),
	}
	for _, id := range sp.GetMinTokensStopIds() {
		p.MinStopIDs = append(p.MinStopIDs, int(id))
	}
	if len(sp.GetLogitBias()) > 0 {
		p.LogitBias = make(map[int]float64, len(sp.GetLogitBias()))
		for id, b := range sp.GetLogitBias() {
			p.LogitBias[int(id)] = b
		}
	}
	return p
}

// ToProto returns p's protobuf form. Ids and counts must fit int32 (the callers check them against the
// vocabulary and the context first).
func ToProto(p sample.Params) *pb.SamplingParams {
	sp := &pb.SamplingParams{
		Temperature:       p.Temperature,
		TopK:              int32(p.TopK),
		TopP:              p.TopP,
		Seed:              p.Seed,
		MinTokens:         int32(p.MinTokens),
		RepetitionPenalty: p.RepetitionPenalty,
		FrequencyPenalty:  p.FrequencyPenalty,
		PresencePenalty:   p.PresencePenalty,
		Logprobs:          p.Logprobs,
		TopLogprobs:       int32(p.TopLogprobs),
	}
	for _, id := range p.MinStopIDs {
		sp.MinTokensStopIds = append(sp.MinTokensStopIds, int32(id))
	}
	if len(p.LogitBias) > 0 {
		sp.LogitBias = make(map[int32]float64, len(p.LogitBias))
		for id, b := range p.LogitBias {
			sp.LogitBias[int32(id)] = b
		}
	}
	return sp
}

// ChoiceLogprobs returns c's logprobs in protobuf form, or nil when p did not ask for them.
func ChoiceLogprobs(p sample.Params, c sample.Choice) *pb.ChosenLogprobs {
	if !p.Logprobs {
		return nil
	}
	out := &pb.ChosenLogprobs{Logprob: c.Logprob}
	for _, t := range c.Top {
		out.Top = append(out.Top, &pb.TokenLogprob{Id: int32(t.ID), Logprob: t.Logprob})
	}
	return out
}

// PromptLogprobs returns a prompt's logprobs (sample.PromptLogprobs.Choices: one per prompt token after
// the first) in protobuf form.
func PromptLogprobs(cs []sample.Choice) []*pb.ChosenLogprobs {
	out := make([]*pb.ChosenLogprobs, len(cs))
	for i, c := range cs {
		out[i] = ChoiceLogprobs(sample.Params{Logprobs: true}, c)
		out[i].Rank = int32(c.Rank)
	}
	return out
}
