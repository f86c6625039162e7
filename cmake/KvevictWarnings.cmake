# Warning flags for kvevict's own targets (tests, benchmarks, examples), never pushed onto
# consumers. KVEVICT_WERROR turns them into errors (the dev and CI presets set it).
option(KVEVICT_WERROR "Treat warnings as errors in kvevict's own targets" OFF)

function(kvevict_target_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>)
    if(KVEVICT_WERROR)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
    endif()
  endif()
endfunction()

# nvcc: C++20 by hand below CMake 3.26, host warnings passed through.
function(kvevict_cuda_target target)
  # CMake 3.25 knows no CUDA20 and refuses to generate with CUDA_STANDARD 20: pass the flag by hand.
  if(CMAKE_VERSION VERSION_LESS 3.26)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  else()
    set_target_properties(${target} PROPERTIES CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON)
  endif()
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -Xcompiler=-Wall,-Wextra>)
  if(KVEVICT_WERROR)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings>)
  endif()
endfunction()
