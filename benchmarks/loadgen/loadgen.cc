// Parley's load generator, compiled: the same conversations as benchmarks/load.py, at a fraction of
// its CPU, so that the benchmark's cores go to the service it measures.
//
// Each stream has its own channel (its own connection, as separate users have), opens a session,
// waits until every stream has, starts its first turn after a ramp (10 ms per stream, at most 2 s),
// then does --turns turns, pausing 0 to 300 ms between them. A turn: send user_text, read until
// turn_ended; the time to the first `audio` message is measured here, at the client.
//
// One thread drives every stream through one completion queue (gRPC's asynchronous API, with alarms
// for the ramp and the pauses): no thread per stream, no thread switch per message.
//
// Output, on stdout, one JSON object per line: {"turn": {...}} per turn (its first audio at the client,
// the server's own first_audio_ms, its audio messages, whether they came in order, how it ended, its
// index in its stream, when it was sent from the start, and its caption messages), {"error": "..."} per stream
// that failed, and last {"done": {...}} with this process's CPU time and the wall time.

#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "parley/v1/voice.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;

using parley::v1::ConverseRequest;
using parley::v1::ConverseResponse;

struct Options {
  std::string target;
  int streams = 1;
  int turns = 3;
  std::string message = "What is the capital of France?";
  double deadline_s = 600;
  double grace_s = 120;
  bool segment_captions = false;  // --captions segments: the start asks for no caption deltas
};

std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", static_cast<unsigned char>(c));
      out += escaped;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

double cpu_s() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

Clock::time_point after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// gRPC's alarms take the system clock.
std::chrono::system_clock::time_point alarm_after(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::duration<double>(seconds));
}

class Run;

// One conversation. Every asynchronous operation completes on the run's queue with a tag naming the
// stream and the step; a stream has at most one operation in flight.
class Stream {
 public:
  enum class Step { kStarted, kStartWritten, kSessionRead, kRamped, kTurnWritten, kRead, kPaused, kWritesDone,
                    kDrained, kFinished };

  struct Tag {
    Stream* stream;
    Step step;
  };

  Stream(Run& run, unsigned seed);
  void Open();
  void Proceed(Step step, bool ok);
  void Go();  // every stream is open: ramp, then the first turn
  bool finished() const { return finished_; }

 private:
  void* TagFor(Step step) {
    tag_.step = step;
    return &tag_;
  }
  void BeginTurn();
  void Close(const std::string& failure);
  void Fail(const std::string& failure);

  Run& run_;
  std::mt19937 random_;
  Tag tag_{this, Step::kStarted};
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<parley::v1::VoiceService::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientAsyncReaderWriter<ConverseRequest, ConverseResponse>> call_;
  ConverseRequest request_;
  ConverseResponse response_;
  grpc::Alarm alarm_;
  grpc::Status status_;
  std::string failure_;
  bool opened_ = false;
  bool live_ = false;
  bool finished_ = false;
  int turns_done_ = 0;
  Clock::time_point sent_;
  double first_audio_ms_ = -1;
  long audio_messages_ = 0;
  long caption_messages_ = 0;
  long expected_sequence_ = 0;
  long last_segment_ = 0;
  bool in_order_ = true;
};

class Run {
 public:
  explicit Run(const Options& options)
      : options(options), began(Clock::now()), deadline(after(options.deadline_s)) {}

  void Main() {
    std::random_device seeds;
    streams_.reserve(options.streams);
    for (int i = 0; i < options.streams; ++i) {
      streams_.push_back(std::make_unique<Stream>(*this, seeds()));
    }
    for (auto& stream : streams_) {
      stream->Open();
    }
    void* tag = nullptr;
    bool ok = false;
    int finished = 0;
    while (finished < options.streams && queue.Next(&tag, &ok)) {
      auto* t = static_cast<Stream::Tag*>(tag);
      bool was_finished = t->stream->finished();
      t->stream->Proceed(t->step, ok);
      if (!was_finished && t->stream->finished()) {
        ++finished;
      }
    }
    queue.Shutdown();
    while (queue.Next(&tag, &ok)) {
    }
  }

  // A stream opened (or failed to): once every one has, they all start.
  void Arrived() {
    if (++arrived_ == options.streams) {
      for (auto& stream : streams_) {
        stream->Go();
      }
    }
  }

  void Live(int change) {
    live_ += change;
    peak = std::max(peak, live_);
  }

  const Options& options;
  const Clock::time_point began;
  const Clock::time_point deadline;
  grpc::CompletionQueue queue;
  int peak = 0;

 private:
  std::vector<std::unique_ptr<Stream>> streams_;
  int arrived_ = 0;
  int live_ = 0;
};

Stream::Stream(Run& run, unsigned seed) : run_(run), random_(seed) {
  grpc::ChannelArguments arguments;
  arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
  channel_ = grpc::CreateCustomChannel(run.options.target, grpc::InsecureChannelCredentials(), arguments);
  stub_ = parley::v1::VoiceService::NewStub(channel_);
}

void Stream::Open() {
  // No turn starts after the run's deadline; one under way gets --grace-s more to end, then the call
  // is cut (a service that stalls fails its streams instead of holding the generator for ever).
  context_.set_deadline(alarm_after(run_.options.deadline_s + run_.options.grace_s));
  call_ = stub_->PrepareAsyncConverse(&context_, &run_.queue);
  call_->StartCall(TagFor(Step::kStarted));
}

void Stream::Go() {
  if (!opened_) {
    return;  // (it is closing already)
  }
  double ramp_s = std::min(2.0, 0.01 * run_.options.streams);
  alarm_.Set(&run_.queue, alarm_after(std::uniform_real_distribution<>(0, ramp_s)(random_)), TagFor(Step::kRamped));
}

void Stream::BeginTurn() {
  if (turns_done_ >= run_.options.turns || Clock::now() >= run_.deadline) {
    Close("");
    return;
  }
  request_.Clear();
  request_.mutable_user_text()->set_text(run_.options.message);
  first_audio_ms_ = -1;
  audio_messages_ = caption_messages_ = expected_sequence_ = last_segment_ = 0;
  in_order_ = true;
  sent_ = Clock::now();
  call_->Write(request_, TagFor(Step::kTurnWritten));
}

void Stream::Close(const std::string& failure) {
  failure_ = failure;
  if (live_) {
    live_ = false;
    run_.Live(-1);
  }
  call_->WritesDone(TagFor(Step::kWritesDone));
}

void Stream::Fail(const std::string& failure) {
  failure_ = failure;
  if (live_) {
    live_ = false;
    run_.Live(-1);
  }
  context_.TryCancel();  // (a call still open would never finish otherwise; a status already in stays)
  call_->Finish(&status_, TagFor(Step::kFinished));
}

void Stream::Proceed(Step step, bool ok) {
  switch (step) {
    case Step::kStarted:
      if (!ok) {
        run_.Arrived();
        return Fail("the call did not start");
      }
      request_.mutable_start();
      if (run_.options.segment_captions) request_.mutable_start()->set_captions(parley::v1::CAPTION_MODE_SEGMENTS);
      call_->Write(request_, TagFor(Step::kStartWritten));
      return;
    case Step::kStartWritten:
      if (!ok) {
        run_.Arrived();
        return Fail("writing start failed");
      }
      call_->Read(&response_, TagFor(Step::kSessionRead));
      return;
    case Step::kSessionRead:
      opened_ = ok && response_.has_session_started();
      run_.Arrived();
      if (!opened_) {
        return Fail("no session_started");
      }
      return;  // (Go() comes once every stream arrived)
    case Step::kRamped:
      live_ = true;
      run_.Live(1);
      return BeginTurn();
    case Step::kTurnWritten:
      if (!ok) {
        return Fail("writing user_text failed");
      }
      call_->Read(&response_, TagFor(Step::kRead));
      return;
    case Step::kRead:
      if (!ok) {
        return Fail("the stream ended during a turn");
      }
      if (response_.has_audio()) {
        if (first_audio_ms_ < 0) {
          first_audio_ms_ = std::chrono::duration<double, std::milli>(Clock::now() - sent_).count();
        }
        const auto& audio = response_.audio();
        in_order_ = in_order_ && static_cast<long>(audio.sequence()) == expected_sequence_ &&
                    static_cast<long>(audio.segment_index()) >= last_segment_;
        expected_sequence_ = static_cast<long>(audio.sequence()) + 1;
        last_segment_ = static_cast<long>(audio.segment_index());
        ++audio_messages_;
      } else if (response_.has_text_delta()) {
        ++caption_messages_;
      } else if (response_.has_turn_ended()) {
        const auto& ended = response_.turn_ended();
        std::printf(
            "{\"turn\": {\"first_audio_ms\": %.3f, \"server_first_audio_ms\": %lld, \"audio_messages\": %ld, "
            "\"in_order\": %s, \"reason\": \"%s\", \"index\": %d, \"sent_s\": %.3f, \"caption_messages\": %ld}}\n",
            first_audio_ms_, static_cast<long long>(ended.timings().first_audio_ms()), audio_messages_,
            in_order_ ? "true" : "false", parley::v1::TurnEndReason_Name(ended.reason()).c_str(), turns_done_,
            std::chrono::duration<double>(sent_ - run_.began).count(), caption_messages_);
        ++turns_done_;
        alarm_.Set(&run_.queue, alarm_after(std::uniform_real_distribution<>(0, 0.3)(random_)), TagFor(Step::kPaused));
        return;
      }
      call_->Read(&response_, TagFor(Step::kRead));
      return;
    case Step::kPaused:
      return BeginTurn();
    case Step::kWritesDone:
    case Step::kDrained:
      if (ok) {
        call_->Read(&response_, TagFor(Step::kDrained));  // whatever is left, until the server's end
        return;
      }
      call_->Finish(&status_, TagFor(Step::kFinished));
      return;
    case Step::kFinished:
      finished_ = true;
      if (!failure_.empty() || !status_.ok()) {
        std::string what = failure_.empty() ? status_.error_message() : failure_ + ": " + status_.error_message();
        std::printf("{\"error\": %s}\n", quoted(what).c_str());
      }
      return;
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (argc % 2 == 0) {
    std::fprintf(stderr, "loadgen: %s has no value\n", argv[argc - 1]);
    return 2;
  }
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string name = argv[i];
    std::string value = argv[i + 1];
    if (name == "--target") {
      options.target = value;
    } else if (name == "--streams") {
      options.streams = std::atoi(value.c_str());
    } else if (name == "--turns") {
      options.turns = std::atoi(value.c_str());
    } else if (name == "--message") {
      options.message = value;
    } else if (name == "--deadline-s") {
      options.deadline_s = std::atof(value.c_str());
    } else if (name == "--grace-s") {
      options.grace_s = std::atof(value.c_str());
    } else if (name == "--captions" && (value == "deltas" || value == "segments")) {
      options.segment_captions = value == "segments";
    } else {
      std::fprintf(stderr, "loadgen: unknown option %s\n", name.c_str());
      return 2;
    }
  }
  if (options.target.empty() || options.streams < 1 || options.turns < 1) {
    std::fprintf(stderr,
                 "usage: loadgen --target HOST:PORT --streams N --turns N [--message TEXT] [--deadline-s S] "
                 "[--grace-s S] [--captions deltas|segments]\n");
    return 2;
  }
  auto began = Clock::now();
  double cpu_before = cpu_s();
  Run run(options);
  run.Main();
  std::printf("{\"done\": {\"cpu_s\": %.3f, \"wall_s\": %.3f, \"peak_streams\": %d}}\n", cpu_s() - cpu_before,
              std::chrono::duration<double>(Clock::now() - began).count(), run.peak);
  return 0;
}
