// A user's MPI program: moekit::mpi's transport (run here as one rank).
#include <moekit/dist/mpi.hpp>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  moekit::dist::MpiSession session(argc, argv);
  moekit::dist::MpiTransport transport;
  std::vector<std::int64_t> ranks = {1};
  transport.all_reduce_sum(ranks);
  if (ranks[0] != transport.size()) {
    std::printf("all_reduce_sum gave %lld for %d ranks\n", static_cast<long long>(ranks[0]),
                transport.size());
    return 1;
  }
  std::printf("moekit %s MPI consumer: rank %d of %d\n", MOEKIT_VERSION_STRING, transport.rank(),
              transport.size());
  return 0;
}
