//! What a `.pt` file's pickles name, checked before anything reads them.
//!
//! A `.pt` file is one or more pickles (in a zip archive since PyTorch 1.6, one after the
//! other before that), and unpickling calls every callable a pickle names. burn-store's reader
//! calls none, but it drops what it cannot represent, so a checkpoint that would run
//! `os.system` in PyTorch would read as a clean state dict. This walks every opcode of every
//! pickle, with the pickle machine's stack and memo shadowed well enough to know the module
//! and name of each `GLOBAL`, `STACK_GLOBAL` and `INST`, and refuses any name outside what a
//! state dict needs (tensor rebuilding, `OrderedDict`, dtypes, storages), as PyTorch's own
//! `weights_only` loading does.

use std::collections::HashMap;
use std::io::Read;

/// The globals a state dict's pickle uses.
const ALLOWED: &[(&str, &[&str])] = &[
    ("collections", &["OrderedDict"]),
    (
        "torch._utils",
        &[
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        ],
    ),
    ("torch._tensor", &["_rebuild_from_type_v2"]),
    ("torch.nn.parameter", &["Parameter"]),
    ("builtins", &["set", "frozenset"]),
    ("__builtin__", &["set", "frozenset"]),
    // How protocol 2 writes `bytes`.
    ("_codecs", &["encode"]),
    (
        "torch",
        &[
            "Tensor",
            "Size",
            "device",
            "dtype",
            "float",
            "float16",
            "float32",
            "float64",
            "half",
            "double",
            "bfloat16",
            "int",
            "int8",
            "int16",
            "int32",
            "int64",
            "long",
            "short",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "bool",
            "FloatStorage",
            "DoubleStorage",
            "HalfStorage",
            "BFloat16Storage",
            "LongStorage",
            "IntStorage",
            "ShortStorage",
            "CharStorage",
            "ByteStorage",
            "BoolStorage",
            "UntypedStorage",
            "TypedStorage",
        ],
    ),
];

/// Why a file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A pickle names `module.name`, which is not on the list (nor in `extra`).
    Global(String),
    /// The file could not be walked (not a pickle or zip of pickles, truncated, malformed).
    Unreadable(String),
}

/// Checks every pickle of the `.pt` file at `path`; `extra` holds `module.name` globals the
/// caller trusts besides the list.
pub(crate) fn check_file(path: &std::path::Path, extra: &[String]) -> Result<(), Refusal> {
    use std::io::Seek;
    let mut file = std::fs::File::open(path)
        .map_err(|error| Refusal::Unreadable(format!("cannot open: {error}")))?;
    let mut head = [0u8; 2];
    let zip = file.read_exact(&mut head).is_ok() && &head == b"PK";
    file.rewind()
        .map_err(|error| Refusal::Unreadable(format!("cannot read: {error}")))?;
    if zip {
        return check_zip(std::io::BufReader::new(file), extra);
    }
    let mut bytes = Vec::new();
    std::io::BufReader::new(file)
        .read_to_end(&mut bytes)
        .map_err(|error| Refusal::Unreadable(format!("cannot read: {error}")))?;
    check(&bytes, extra)
}

/// Checks every `.pkl` entry of a zip archive (`torch.save` since PyTorch 1.6).
fn check_zip<R: Read + std::io::Seek>(reader: R, extra: &[String]) -> Result<(), Refusal> {
    let mut archive = zip::ZipArchive::new(reader)
        .map_err(|error| Refusal::Unreadable(format!("zip archive: {error}")))?;
    let mut pickles = 0;
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|error| Refusal::Unreadable(format!("zip entry {index}: {error}")))?;
        // A name that is not valid UTF-8 is checked too.
        let name = entry
            .name()
            .map(|name| name.into_owned())
            .unwrap_or_else(|_| format!("entry {index}.pkl"));
        if !name.ends_with(".pkl") {
            continue;
        }
        let mut pickle = Vec::new();
        entry
            .read_to_end(&mut pickle)
            .map_err(|error| Refusal::Unreadable(format!("{name}: {error}")))?;
        walk(&pickle, extra)?;
        pickles += 1;
    }
    if pickles == 0 {
        return Err(Refusal::Unreadable(
            "a zip archive without a .pkl entry".into(),
        ));
    }
    Ok(())
}

/// Checks every pickle of the `.pt` file `bytes`.
pub(crate) fn check(bytes: &[u8], extra: &[String]) -> Result<(), Refusal> {
    if bytes.starts_with(b"PK") {
        return check_zip(std::io::Cursor::new(bytes), extra);
    }
    if bytes.first() != Some(&PROTO) {
        return Err(Refusal::Unreadable(
            "neither a zip archive nor a pickle (PyTorch's tar format of before 0.1.10 is \
             not read)"
                .into(),
        ));
    }
    // A plain pickle, or the legacy format: five pickles (magic number, protocol, system
    // info, the object, the storage keys), then raw storage bytes.
    let mut at = 0;
    for _ in 0..5 {
        if bytes.get(at) != Some(&PROTO) {
            break;
        }
        at += walk(&bytes[at..], extra)?;
    }
    Ok(())
}

const PROTO: u8 = 0x80;

/// A value on the shadowed stack: a string (the operands of `STACK_GLOBAL`), a mark, or
/// anything else.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    Str(String),
    Mark,
    Other,
}

/// Walks one pickle from the start of `bytes` to its `STOP`; returns its length.
fn walk(bytes: &[u8], extra: &[String]) -> Result<usize, Refusal> {
    let mut reader = Reader { bytes, at: 0 };
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: HashMap<u64, Item> = HashMap::new();
    loop {
        let op = reader.u8()?;
        match op {
            b'.' => return Ok(reader.at), // STOP
            b'(' => stack.push(Item::Mark),
            b'0' => pop(&mut stack, 1)?,
            b'1' => pop_mark(&mut stack)?,
            b'2' => {
                let top = stack.last().cloned().ok_or_else(underflow)?;
                stack.push(top);
            }
            // Values with a line argument.
            b'F' | b'I' | b'L' => {
                reader.line()?;
                stack.push(Item::Other);
            }
            b'S' | b'V' => {
                let line = reader.line()?;
                stack.push(Item::Str(String::from_utf8_lossy(line).into_owned()));
            }
            b'P' => {
                reader.line()?;
                stack.push(Item::Other);
            }
            // Fixed-size values.
            b'J' => push_skip(&mut reader, &mut stack, 4)?,
            b'K' => push_skip(&mut reader, &mut stack, 1)?,
            b'M' => push_skip(&mut reader, &mut stack, 2)?,
            b'G' => push_skip(&mut reader, &mut stack, 8)?,
            b'N' | 0x88 | 0x89 | b'}' | b']' | b')' | 0x8f => stack.push(Item::Other),
            // Length-prefixed strings and bytes.
            b'T' | b'X' | b'B' => {
                let len = reader.le(4)?;
                push_data(&mut reader, &mut stack, len, op != b'B')?
            }
            b'U' | b'C' | 0x8c => {
                let len = reader.le(1)?;
                push_data(&mut reader, &mut stack, len, op == 0x8c || op == b'U')?
            }
            0x8d | 0x8e | 0x96 => {
                let len = reader.le(8)?;
                push_data(&mut reader, &mut stack, len, op == 0x8d)?
            }
            0x8a => {
                let len = reader.le(1)?;
                push_data(&mut reader, &mut stack, len, false)?
            }
            0x8b => {
                let len = reader.le(4)?;
                push_data(&mut reader, &mut stack, len, false)?
            }
            b'Q' => {
                pop(&mut stack, 1)?;
                stack.push(Item::Other);
            }
            b'R' => {
                pop(&mut stack, 2)?;
                stack.push(Item::Other);
            }
            b'b' => {
                pop(&mut stack, 1)?;
                pop(&mut stack, 1)?;
                stack.push(Item::Other);
            }
            b'c' => {
                let module = String::from_utf8_lossy(reader.line()?).into_owned();
                let name = String::from_utf8_lossy(reader.line()?).into_owned();
                allow(&module, &name, extra)?;
                stack.push(Item::Other);
            }
            b'i' => {
                let module = String::from_utf8_lossy(reader.line()?).into_owned();
                let name = String::from_utf8_lossy(reader.line()?).into_owned();
                allow(&module, &name, extra)?;
                pop_mark(&mut stack)?;
                stack.push(Item::Other);
            }
            0x93 => {
                let name = stack.pop().ok_or_else(underflow)?;
                let module = stack.pop().ok_or_else(underflow)?;
                match (module, name) {
                    (Item::Str(module), Item::Str(name)) => allow(&module, &name, extra)?,
                    _ => {
                        return Err(Refusal::Unreadable(
                            "a STACK_GLOBAL whose module and name are not plain strings".into(),
                        ));
                    }
                }
                stack.push(Item::Other);
            }
            b'o' | b'd' | b'l' | b't' | 0x91 => {
                pop_mark(&mut stack)?;
                stack.push(Item::Other);
            }
            0x81 => {
                pop(&mut stack, 2)?;
                stack.push(Item::Other);
            }
            0x92 => {
                pop(&mut stack, 3)?;
                stack.push(Item::Other);
            }
            0x85..=0x87 => {
                pop(&mut stack, usize::from(op - 0x84))?;
                stack.push(Item::Other);
            }
            b'a' => pop(&mut stack, 1)?,
            b's' => pop(&mut stack, 2)?,
            b'e' | b'u' | 0x90 => {
                pop_mark(&mut stack)?;
                // The list, dict or set the items went into stays.
                if stack.is_empty() {
                    return Err(underflow());
                }
            }
            // Memo.
            b'g' => {
                let index = parse_index(reader.line()?)?;
                stack.push(memo.get(&index).cloned().unwrap_or(Item::Other));
            }
            b'h' => {
                let index = reader.le(1)?;
                stack.push(memo.get(&index).cloned().unwrap_or(Item::Other));
            }
            b'j' => {
                let index = reader.le(4)?;
                stack.push(memo.get(&index).cloned().unwrap_or(Item::Other));
            }
            b'p' => {
                let index = parse_index(reader.line()?)?;
                memo.insert(index, stack.last().cloned().ok_or_else(underflow)?);
            }
            b'q' => {
                let index = reader.le(1)?;
                memo.insert(index, stack.last().cloned().ok_or_else(underflow)?);
            }
            b'r' => {
                let index = reader.le(4)?;
                memo.insert(index, stack.last().cloned().ok_or_else(underflow)?);
            }
            0x94 => {
                let index = memo.len() as u64;
                memo.insert(index, stack.last().cloned().ok_or_else(underflow)?);
            }
            PROTO => {
                reader.take(1)?;
            }
            0x95 => {
                reader.take(8)?;
            }
            0x97 => stack.push(Item::Other),
            0x98 => {}
            0x82..=0x84 => {
                return Err(Refusal::Unreadable(
                    "an EXT opcode (a global named through the copyreg extension registry)".into(),
                ));
            }
            other => {
                return Err(Refusal::Unreadable(format!(
                    "unknown pickle opcode 0x{other:02x} at byte {}",
                    reader.at - 1
                )));
            }
        }
    }
}

fn allow(module: &str, name: &str, extra: &[String]) -> Result<(), Refusal> {
    let listed = ALLOWED
        .iter()
        .any(|(m, names)| *m == module && names.contains(&name));
    let full = format!("{module}.{name}");
    if listed || extra.contains(&full) {
        Ok(())
    } else {
        Err(Refusal::Global(full))
    }
}

fn underflow() -> Refusal {
    Refusal::Unreadable("malformed pickle (stack underflow)".into())
}

fn pop(stack: &mut Vec<Item>, count: usize) -> Result<(), Refusal> {
    for _ in 0..count {
        stack.pop().ok_or_else(underflow)?;
    }
    Ok(())
}

fn pop_mark(stack: &mut Vec<Item>) -> Result<(), Refusal> {
    while let Some(item) = stack.pop() {
        if item == Item::Mark {
            return Ok(());
        }
    }
    Err(Refusal::Unreadable("malformed pickle (no mark)".into()))
}

fn push_skip(reader: &mut Reader, stack: &mut Vec<Item>, len: usize) -> Result<(), Refusal> {
    reader.take(len)?;
    stack.push(Item::Other);
    Ok(())
}

fn push_data(
    reader: &mut Reader,
    stack: &mut Vec<Item>,
    len: u64,
    text: bool,
) -> Result<(), Refusal> {
    let len = usize::try_from(len).map_err(|_| truncated())?;
    let data = reader.take(len)?;
    stack.push(match text {
        true => Item::Str(String::from_utf8_lossy(data).into_owned()),
        false => Item::Other,
    });
    Ok(())
}

fn parse_index(line: &[u8]) -> Result<u64, Refusal> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Refusal::Unreadable("malformed pickle (memo index)".into()))
}

fn truncated() -> Refusal {
    Refusal::Unreadable("truncated pickle".into())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], Refusal> {
        let end = self.at.checked_add(len).ok_or_else(truncated)?;
        let data = self.bytes.get(self.at..end).ok_or_else(truncated)?;
        self.at = end;
        Ok(data)
    }

    fn u8(&mut self) -> Result<u8, Refusal> {
        Ok(self.take(1)?[0])
    }

    /// A little-endian unsigned number of `len` bytes.
    fn le(&mut self, len: usize) -> Result<u64, Refusal> {
        let data = self.take(len)?;
        Ok(data
            .iter()
            .rev()
            .fold(0u64, |value, &byte| (value << 8) | u64::from(byte)))
    }

    /// Up to the next newline (excluded).
    fn line(&mut self) -> Result<&'a [u8], Refusal> {
        let rest = &self.bytes[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(truncated)?;
        self.at += end + 1;
        Ok(&rest[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pickle(body: &[u8]) -> Vec<u8> {
        let mut p = vec![PROTO, 4];
        p.extend(body);
        p.push(b'.');
        p
    }

    fn short_unicode(s: &str) -> Vec<u8> {
        let mut p = vec![0x8c, s.len() as u8];
        p.extend(s.as_bytes());
        p
    }

    #[test]
    fn stack_global_names_are_tracked_through_pops_and_the_memo() {
        // "os", "system", "collections", "OrderedDict", POP, POP -> STACK_GLOBAL os.system.
        let mut body = Vec::new();
        for s in ["os", "system", "collections", "OrderedDict"] {
            body.extend(short_unicode(s));
        }
        body.extend([b'0', b'0', 0x93]);
        assert_eq!(
            check(&pickle(&body), &[]),
            Err(Refusal::Global("os.system".into()))
        );
        // Through the memo: "os" memoized, popped, fetched back.
        let mut body = short_unicode("os");
        body.extend([0x94, b'0']);
        body.extend(short_unicode("collections"));
        body.extend([b'0', b'h', 0]);
        body.extend(short_unicode("system"));
        body.push(0x93);
        assert_eq!(
            check(&pickle(&body), &[]),
            Err(Refusal::Global("os.system".into()))
        );
        // An allowed one passes; a trusted extra one too.
        let mut body = short_unicode("collections");
        body.extend(short_unicode("OrderedDict"));
        body.extend([0x93, b')', b'R']);
        assert_eq!(check(&pickle(&body), &[]), Ok(()));
        let mut body = short_unicode("numpy");
        body.extend(short_unicode("dtype"));
        body.extend([0x93, b'0', b'}']);
        assert_eq!(
            check(&pickle(&body), &[]),
            Err(Refusal::Global("numpy.dtype".into()))
        );
        assert_eq!(check(&pickle(&body), &["numpy.dtype".into()]), Ok(()));
    }

    #[test]
    fn malformed_and_truncated_pickles_are_refused() {
        for bad in [
            vec![PROTO, 2, b'0', b'.'],             // pop from an empty stack
            vec![PROTO, 2, b'X', 9, 0, 0, 0, b'a'], // string longer than the file
            vec![PROTO, 2, b'c', b'o', b's'],       // GLOBAL without its newlines
            vec![PROTO, 2, 0x82, 1, b'.'],          // EXT1
            vec![PROTO, 2, 0xff, b'.'],             // not an opcode
            vec![PROTO, 2, b'}'],                   // no STOP
            b"PK\x03\x04 not really a zip".to_vec(),
            b"plain text".to_vec(),
        ] {
            assert!(
                matches!(check(&bad, &[]), Err(Refusal::Unreadable(_))),
                "{bad:?}"
            );
        }
    }
}
