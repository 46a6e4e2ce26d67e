# check_release_sha512(<sha512> <what>): fails unless <sha512> is a real
# SHA512 (128 lower-case hex digits), not a placeholder such as 0 or all zeros.
# Shared by the emulated vcpkg_download_distfile and the release check.
function(check_release_sha512 sha512 what)
  string(LENGTH "${sha512}" length)
  if(NOT sha512 MATCHES "^[0-9a-f]+$" OR NOT length EQUAL 128 OR sha512 MATCHES "^0+$")
    message(FATAL_ERROR "${what}: SHA512 '${sha512}' is a placeholder, not a SHA512; "
                        "tools/make_release.sh --update-port writes the release archive's")
  endif()
endfunction()
