// Eager autograd on CPU tensors of every op family: rsample, elbo, gaussian_kl,
// the two log-likelihoods, iwae_bound and free_bits_kl:
// the same formulas as their Python registration (fastelbo/_ops.py, _AUTOGRAD,
// which every other backend and device keeps), without Python on the way.
//
// torch.library's register_autograd runs a Python autograd.Function around every
// call and rebuilds the argument list from the schema first: about 40 us per elbo
// call and 12 us per rsample against a few here, plus a Python backward per op.
// At B=256 that glue was 70% of a step. A kernel registered for AutogradCPU
// takes precedence over the Python one registered for the Autograd alias, so this
// file changes nothing else: torch.compile traces through it (it calls the ops,
// forward and backward, through the dispatcher), autocast runs before it, and
// the backward ops keep their double-backward error.
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace fastelbo {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using ElboSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const OptTensor&, const OptTensor&,
                                                                const OptTensor&, c10::string_view, double, bool);
using ElboBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view, double,
    std::array<bool, 7>);
using RsampleSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t);
using RsampleBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const OptTensor&, std::array<bool, 2>);
using KlSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&);
using KlBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, std::array<bool, 4>);
using BernoulliSig = at::Tensor(const at::Tensor&, const at::Tensor&, bool);
using BernoulliBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, std::array<bool, 2>);
using GaussianSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using IwaeSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                   const OptTensor&, const OptTensor&, c10::string_view, bool);
using IwaeBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&,
                                               c10::string_view, std::array<bool, 8>);
using FreeBitsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                       const OptTensor&, double);
using FreeBitsBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    double, std::array<bool, 4>);
using GaussianBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                           const at::Tensor&, const at::Tensor&,
                                                                           std::array<bool, 3>);

// The ops through the dispatcher (handles looked up once; thread-safe statics).
#define FASTELBO_OP(fn, name, Sig)                                                                     \
  const c10::TypedOperatorHandle<Sig>& fn() {                                                          \
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>(); \
    return handle;                                                                                     \
  }
using ElboLossSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view,
                                           double, c10::string_view, std::array<bool, 7>, bool);
FASTELBO_OP(elbo_op, "fastelbo::elbo", ElboSig)
FASTELBO_OP(elbo_loss_op, "fastelbo::elbo_loss", ElboLossSig)
FASTELBO_OP(elbo_backward_op, "fastelbo::elbo_backward", ElboBackwardSig)
FASTELBO_OP(rsample_op, "fastelbo::rsample", RsampleSig)
FASTELBO_OP(rsample_backward_op, "fastelbo::rsample_backward", RsampleBackwardSig)
FASTELBO_OP(kl_op, "fastelbo::gaussian_kl", KlSig)
FASTELBO_OP(kl_backward_op, "fastelbo::gaussian_kl_backward", KlBackwardSig)
FASTELBO_OP(bernoulli_op, "fastelbo::bernoulli_log_prob", BernoulliSig)
FASTELBO_OP(bernoulli_backward_op, "fastelbo::bernoulli_log_prob_backward", BernoulliBackwardSig)
FASTELBO_OP(gaussian_op, "fastelbo::gaussian_log_prob", GaussianSig)
FASTELBO_OP(gaussian_backward_op, "fastelbo::gaussian_log_prob_backward", GaussianBackwardSig)
FASTELBO_OP(iwae_op, "fastelbo::iwae_bound", IwaeSig)
FASTELBO_OP(iwae_backward_op, "fastelbo::iwae_bound_backward", IwaeBackwardSig)
FASTELBO_OP(free_bits_op, "fastelbo::free_bits_kl", FreeBitsSig)
FASTELBO_OP(free_bits_backward_op, "fastelbo::free_bits_kl_backward", FreeBitsBackwardSig)
#undef FASTELBO_OP

OptTensor present(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
bool wants(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

// The backward ops: below autograd unless a graph of the backward is being built
// (create_graph), where their own autograd raises the double-backward error.
template <class F>
auto backward_call(F call) {
  if (c10::GradMode::is_enabled()) return call();
  at::AutoDispatchBelowADInplaceOrView below;
  return call();
}

struct ElboFunction : public torch::autograd::Function<ElboFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& recon,
                               const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& obs_logvar,
                               const OptTensor& prior_mu, const OptTensor& prior_logvar, c10::string_view likelihood,
                               double beta, bool validate_x) {
    std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = elbo_op().call(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood,
                                               beta, validate_x);
    }
    // A loss uses one of (elbo, loglik, kl): the op takes None for the other upstream gradients.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, recon, mu, logvar, or_undefined(obs_logvar), or_undefined(prior_mu),
                            or_undefined(prior_logvar)});
    ctx->saved_data["likelihood"] = std::string(likelihood);
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["mask"] = c10::List<bool>({x.requires_grad(), recon.requires_grad(), mu.requires_grad(),
                                               logvar.requires_grad(), wants(obs_logvar), wants(prior_mu),
                                               wants(prior_logvar)});
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const c10::List<bool> m = ctx->saved_data["mask"].toBoolList();
    const std::array<bool, 7> mask = {m[0], m[1], m[2], m[3], m[4], m[5], m[6]};
    const std::string likelihood = ctx->saved_data["likelihood"].toStringRef();
    const double beta = ctx->saved_data["beta"].toDouble();
    auto d = backward_call([&] {
      return elbo_backward_op().call(present(grads[0]), present(grads[1]), present(grads[2]), s[0], s[1], s[2], s[3], present(s[4]),
                present(s[5]), present(s[6]), likelihood, beta, mask);
    });
    const std::array<at::Tensor, 7> all = {std::get<0>(d), std::get<1>(d), std::get<2>(d), std::get<3>(d),
                                           std::get<4>(d), std::get<5>(d), std::get<6>(d)};
    variable_list out(10);  // one per forward argument; likelihood, beta and validate_x have none
    for (size_t i = 0; i < 7; ++i)
      if (mask[i]) out[i] = all[i];
    return out;
  }
};

// z = mu + e^(lv/2) eps; the backward regenerates eps from the seed (or reads the caller's eps).
struct RsampleFunction : public torch::autograd::Function<RsampleFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const at::Tensor& seed, const OptTensor& eps, int64_t num_samples) {
    at::Tensor z;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      z = rsample_op().call(mu, logvar, seed, eps, num_samples);
    }
    const bool need_lv = logvar.requires_grad(), need_eps = wants(eps);
    ctx->saved_data["need"] = c10::List<bool>({mu.requires_grad(), need_lv, need_eps});
    // Backward needs logvar and the seed (or the caller's eps); never mu, never z.
    if (need_lv || need_eps) ctx->save_for_backward({logvar, seed, or_undefined(eps)});
    return {z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    const at::Tensor& grad_z = grads[0];
    variable_list out(5);  // mu, logvar, seed, eps, num_samples
    if (need[1] || need[2]) {
      const variable_list s = ctx->get_saved_variables();
      auto d = backward_call([&] {
        return rsample_backward_op().call(grad_z, s[0], s[1], present(s[2]), {need[1], need[2]});
      });
      if (need[1]) out[1] = std::get<0>(d);
      if (need[2]) out[3] = std::get<1>(d);
    }
    if (need[0]) out[0] = grad_z.dim() == 2 ? grad_z : grad_z.sum(0);  // z[k] = mu + ...: the K gradients add up
    return out;
  }
};

// The single-term ops: op(inputs..., scalars) -> [B]; op_backward(grad, the same
// tensor inputs, mask) -> one gradient per tensor input. Inputs are kept only
// when some gradient is wanted (they are inputs: no new memory).
template <size_t N>
void save_inputs(AutogradContext* ctx, const std::array<bool, N>& mask, const variable_list& inputs) {
  c10::List<bool> saved;
  for (bool m : mask) saved.push_back(m);
  ctx->saved_data["mask"] = saved;
  for (bool m : mask)
    if (m) {
      ctx->save_for_backward(inputs);
      return;
    }
}

template <size_t N>
std::array<bool, N> saved_mask(AutogradContext* ctx) {
  const c10::List<bool> m = ctx->saved_data["mask"].toBoolList();
  std::array<bool, N> mask{};
  for (size_t i = 0; i < N; ++i) mask[i] = m[i];
  return mask;
}

// The gradients asked for, in forward-argument order; `args` counts the scalars too.
template <size_t N, class Tuple>
variable_list masked_grads(const Tuple& d, const std::array<bool, N>& mask, size_t args) {
  const std::array<at::Tensor, N> all = std::apply([](const auto&... g) { return std::array<at::Tensor, N>{g...}; }, d);
  variable_list out(args);
  for (size_t i = 0; i < N; ++i)
    if (mask[i]) out[i] = all[i];
  return out;
}

template <class F>
at::Tensor below_autograd(F call) {
  at::AutoDispatchBelowADInplaceOrView below;
  return call();
}

struct KlFunction : public torch::autograd::Function<KlFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const OptTensor& prior_mu, const OptTensor& prior_logvar) {
    const at::Tensor kl = below_autograd([&] { return kl_op().call(mu, logvar, prior_mu, prior_logvar); });
    save_inputs<4>(ctx, {mu.requires_grad(), logvar.requires_grad(), wants(prior_mu), wants(prior_logvar)},
                   {mu, logvar, or_undefined(prior_mu), or_undefined(prior_logvar)});
    return {kl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const auto mask = saved_mask<4>(ctx);
    auto d = backward_call(
        [&] { return kl_backward_op().call(grads[0], s[0], s[1], present(s[2]), present(s[3]), mask); });
    return masked_grads(d, mask, 4);
  }
};

struct BernoulliFunction : public torch::autograd::Function<BernoulliFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& x,
                               bool validate_x) {
    const at::Tensor ll = below_autograd([&] { return bernoulli_op().call(logits, x, validate_x); });
    save_inputs<2>(ctx, {logits.requires_grad(), x.requires_grad()}, {logits, x});
    return {ll};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const auto mask = saved_mask<2>(ctx);
    auto d = backward_call([&] { return bernoulli_backward_op().call(grads[0], s[0], s[1], mask); });
    return masked_grads(d, mask, 3);
  }
};

struct GaussianFunction : public torch::autograd::Function<GaussianFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mean, const at::Tensor& x,
                               const at::Tensor& logvar) {
    const at::Tensor ll = below_autograd([&] { return gaussian_op().call(mean, x, logvar); });
    save_inputs<3>(ctx, {mean.requires_grad(), x.requires_grad(), logvar.requires_grad()}, {mean, x, logvar});
    return {ll};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const auto mask = saved_mask<3>(ctx);
    auto d = backward_call([&] { return gaussian_backward_op().call(grads[0], s[0], s[1], s[2], mask); });
    return masked_grads(d, mask, 3);
  }
};

// bound[b] = logsumexp_k log w[k, b] - log K; the [K, B] log-weights (an output,
// accumulation dtype) give the softmax weights of the backward.
struct IwaeFunction : public torch::autograd::Function<IwaeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& recon, const at::Tensor& z,
                               const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& obs_logvar,
                               const OptTensor& prior_mu, const OptTensor& prior_logvar, c10::string_view likelihood,
                               bool validate_x) {
    std::tuple<at::Tensor, at::Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = iwae_op().call(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, validate_x);
    }
    ctx->set_materialize_grads(false);  // a loss uses the bound or the log-weights, rarely both
    save_inputs<8>(ctx,
                   {x.requires_grad(), recon.requires_grad(), z.requires_grad(), mu.requires_grad(),
                    logvar.requires_grad(), wants(obs_logvar), wants(prior_mu), wants(prior_logvar)},
                   {x, recon, z, mu, logvar, or_undefined(obs_logvar), or_undefined(prior_mu),
                    or_undefined(prior_logvar), std::get<1>(out)});
    ctx->saved_data["likelihood"] = std::string(likelihood);
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const auto mask = saved_mask<8>(ctx);
    const std::string likelihood = ctx->saved_data["likelihood"].toStringRef();
    const at::Tensor& log_weights = s[8];
    // d bound[b] / d log w[k, b] = softmax_k(log w)[k, b]: formed on [K, B] in the accumulation dtype.
    at::Tensor g = grads[0].defined() ? at::softmax(log_weights, 0) * grads[0].to(log_weights.scalar_type())
                                      : at::zeros_like(log_weights);
    if (grads[1].defined()) g = g + grads[1];
    auto d = backward_call([&] {
      return iwae_backward_op().call(g, s[0], s[1], s[2], s[3], s[4], present(s[5]), present(s[6]), present(s[7]),
                                     likelihood, mask);
    });
    return masked_grads(d, mask, 10);
  }
};

// kl_dims (an output, [Dz]) decides which dimensions are above the floor; it is a
// statistic, not a loss term.
struct FreeBitsFunction : public torch::autograd::Function<FreeBitsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const OptTensor& prior_mu, const OptTensor& prior_logvar, double free_bits) {
    std::tuple<at::Tensor, at::Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = free_bits_op().call(mu, logvar, prior_mu, prior_logvar, free_bits);
    }
    ctx->mark_non_differentiable({std::get<1>(out)});
    save_inputs<4>(ctx, {mu.requires_grad(), logvar.requires_grad(), wants(prior_mu), wants(prior_logvar)},
                   {mu, logvar, or_undefined(prior_mu), or_undefined(prior_logvar), std::get<1>(out)});
    ctx->saved_data["free_bits"] = free_bits;
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const auto mask = saved_mask<4>(ctx);
    const double free_bits = ctx->saved_data["free_bits"].toDouble();
    auto d = backward_call([&] {
      return free_bits_backward_op().call(grads[0], s[4], s[0], s[1], present(s[2]), present(s[3]), free_bits, mask);
    });
    return masked_grads(d, mask, 5);
  }
};

// The one-pass reduced loss (docs/design.md §5), the C++ twin of fastelbo/_onepass.py's autograd: the
// forward's gradients are saved outputs; the backward hands them over when the upstream gradient is 1 and
// the graph is not retained (autograd frees them right after), else returns a fresh scaled copy, so they
// are never modified. A traced upstream gradient (fake or functional, torch.compile / export) has no value
// to read: the scaled copy.
struct ElboLossFunction : public torch::autograd::Function<ElboLossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& recon,
                               const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& obs_logvar,
                               const OptTensor& prior_mu, const OptTensor& prior_logvar, c10::string_view likelihood,
                               double beta, c10::string_view reduction, std::array<bool, 7> output_mask,
                               bool validate_x) {
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = elbo_loss_op().call(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta,
                                reduction, output_mask, validate_x);
    }
    variable_list all = {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out),
                         std::get<4>(out), std::get<5>(out), std::get<6>(out), std::get<7>(out)};
    variable_list grads(all.begin() + 1, all.end());
    // Not marked non-differentiable: compiled autograd refuses C++ Functions that mark outputs so. Nothing
    // differentiates them (ELBOLoss keeps the loss alone); the backward returns them detached.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(grads);
    // The mask, not needs_input_grad: an absent optional tensor has no edge, so edge indices shift.
    c10::List<bool> mask;
    for (bool m : output_mask) mask.push_back(m);
    ctx->saved_data["mask"] = mask;
    return all;
  }

  static variable_list backward(AutogradContext* ctx, variable_list upstream) {
    variable_list out(12);  // one per forward argument
    const at::Tensor& g = upstream[0];
    if (!g.defined()) return out;
    TORCH_CHECK(!(c10::GradMode::is_enabled() && g.requires_grad()),
                "fastelbo: elbo_loss is not differentiable (double backward through fastelbo's ops is not "
                "supported; use fastelbo.reference for higher-order derivatives)");
    const variable_list stored = ctx->get_saved_variables();
    const bool traced = g.key_set().has(c10::DispatchKey::Python) || at::functionalization::impl::isFunctionalTensor(g);
    const bool hand_over = !traced && g.device().is_cpu() &&
                           !torch::autograd::get_current_graph_task_keep_graph() && g.item<double>() == 1.0;
    const c10::List<bool> mask = ctx->saved_data["mask"].toBoolList();
    for (size_t i = 0; i < 7; ++i) {
      if (!mask[i]) continue;
      out[i] = hand_over ? stored[i].detach() : stored[i].detach() * g.to(stored[i].scalar_type());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
elbo_loss_autograd(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu, const at::Tensor& logvar,
                   const OptTensor& obs_logvar, const OptTensor& prior_mu, const OptTensor& prior_logvar,
                   c10::string_view likelihood, double beta, c10::string_view reduction,
                   std::array<bool, 7> output_mask, bool validate_x) {
  auto o = ElboLossFunction::apply(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta,
                                   reduction, output_mask, validate_x);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> elbo_autograd(const at::Tensor& x, const at::Tensor& recon,
                                                             const at::Tensor& mu, const at::Tensor& logvar,
                                                             const OptTensor& obs_logvar, const OptTensor& prior_mu,
                                                             const OptTensor& prior_logvar,
                                                             c10::string_view likelihood, double beta,
                                                             bool validate_x) {
  auto out = ElboFunction::apply(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta,
                                 validate_x);
  return {out[0], out[1], out[2]};
}

at::Tensor rsample_autograd(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                            const OptTensor& eps, int64_t num_samples) {
  return RsampleFunction::apply(mu, logvar, seed, eps, num_samples)[0];
}

at::Tensor kl_autograd(const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& prior_mu,
                       const OptTensor& prior_logvar) {
  return KlFunction::apply(mu, logvar, prior_mu, prior_logvar)[0];
}

at::Tensor bernoulli_autograd(const at::Tensor& logits, const at::Tensor& x, bool validate_x) {
  return BernoulliFunction::apply(logits, x, validate_x)[0];
}

at::Tensor gaussian_autograd(const at::Tensor& mean, const at::Tensor& x, const at::Tensor& logvar) {
  return GaussianFunction::apply(mean, x, logvar)[0];
}

std::tuple<at::Tensor, at::Tensor> iwae_autograd(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& z,
                                                 const at::Tensor& mu, const at::Tensor& logvar,
                                                 const OptTensor& obs_logvar, const OptTensor& prior_mu,
                                                 const OptTensor& prior_logvar, c10::string_view likelihood,
                                                 bool validate_x) {
  auto out = IwaeFunction::apply(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, validate_x);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> free_bits_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                                      const OptTensor& prior_mu, const OptTensor& prior_logvar,
                                                      double free_bits) {
  auto out = FreeBitsFunction::apply(mu, logvar, prior_mu, prior_logvar, free_bits);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastelbo, AutogradCPU, m) {
  m.impl("elbo", &elbo_autograd);
  m.impl("elbo_loss", &elbo_loss_autograd);
  m.impl("rsample", &rsample_autograd);
  m.impl("gaussian_kl", &kl_autograd);
  m.impl("bernoulli_log_prob", &bernoulli_autograd);
  m.impl("gaussian_log_prob", &gaussian_autograd);
  m.impl("iwae_bound", &iwae_autograd);
  m.impl("free_bits_kl", &free_bits_autograd);
}

}  // namespace cpu
}  // namespace fastelbo
