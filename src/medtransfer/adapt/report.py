"""What `adapt` prints: the shift found, the verdict, what changed and how the new images' ranking moved."""

from __future__ import annotations

from typing import Any

from medtransfer.evaluation.site_shift import detection_lines

__all__ = ["adaptation_lines"]


def adaptation_lines(record: dict[str, Any]) -> list[str]:
    """Console lines of an adaptation record (adaptation.json)."""
    data, ranking, verdict = record["data"], record["ranking"], record["verdict"]
    lines = [f"Adapted with --method {record['method']} to {data['images']} images ({data['patients']} patients by file "
             f"name) of {data['data']} (sha256 {data['sha256'][:12]}...; labels not read)"]
    lines += detection_lines(record["shift_before"])
    fitted = record.get("mixture")
    if fitted:
        fit, ci = fitted["fit"], fitted.get("prevalence_ci")
        lines.append(f"Shifted mixture: validation's class scores moved by {fit['shift_negative']:+.2f} and stretched "
                     f"x{fit.get('scale_negative', 1.0):.2f} (negative), {fit['shift_positive']:+.2f} and "
                     f"x{fit.get('scale_positive', 1.0):.2f} (positive) in calibrated logit, prevalence {fit['prevalence']:.3f}"
                     + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f"; expected sensitivity "
                     f"{fitted['expected_sensitivity']:.3f}, specificity {fitted['expected_specificity']:.3f} at the new "
                     "threshold (model-based estimates, not measurements)")
    lines.append("Changed:")
    lines += [f"  {change}" for change in record["changes"]] or ["  nothing"]
    if ranking["order_unchanged"]:
        lines.append("Ranking of the new images unchanged: the AUC is the same (only probabilities and the threshold moved)")
    else:
        rho = ranking["spearman"]
        lines.append(f"Ranking of the new images CHANGED (Spearman {'n/a' if rho is None else f'{rho:.3f}'} between before "
                     "and after): the AUC on this site may differ and cannot be measured without labels")
    lines.append(f"Decisions changed on {ranking['decisions_changed']} images ({ranking['decisions_changed_fraction']:.1%}); "
                 f"positive calls {ranking['positive_calls_before']:.1%} -> {ranking['positive_calls_after']:.1%}")
    lines.append("Checks passed:")
    lines += [f"  {check}" for check in record.get("checks", [])]
    lines.append(f"Verdict: {verdict['verdict']}")
    lines.append(f"After adaptation the tests find: {verdict['after']}")
    return lines
